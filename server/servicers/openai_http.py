"""The OpenAI-compatible HTTP API (`--http-port`): thin conversions over `ModelHub`, like `inference.py`.

An OpenAI request body becomes the core's request dataclasses; the core's results become OpenAI's JSON objects
(completions, chat completions, their server-sent-event chunks, embeddings, the model list). Errors are
classified once, by `status.status_of` (the gRPC codes the nlpserve.v1 front answers, and the `code` label of
the request metrics); this front only turns that code into an HTTP status and OpenAI's error object
(`_HTTP_OF`). Every route runs through `_Endpoint`: the body read within `--max-message-bytes`, admission
through the drain's Gate, the handler, the error mapping, the request metrics, and the client's disconnect,
which cancels the handler and so closes the core's stream: its sequence leaves the batch at the next step, as
when a gRPC client cancels.

Routes: GET /health (never needs a key), GET /metrics, GET /v1/models, GET /v1/models/{model},
POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings. See docs/server.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidInput, ServeError, loads_json, shown, shown_number
from ..metrics import Metrics
from ..models import ModelHub, ServedModel
from ..repository import CLASSIFIER, EMBEDDER, GENERATOR
from ..security import UNAUTHENTICATED_MESSAGE
from ..types import (
    ClassifyRequest,
    EmbedRequest,
    FinishReason,
    GenerateRequest,
    GenerationChunk,
    ModelDescription,
    SamplingParams,
)
from .status import Call, Gate, _finish, _log_unexpected, status_of

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# The `method` label of the request metrics (bounded: one per route, streams apart as gRPC's GenerateStream).
LIST_MODELS = "OpenAI.ListModels"
GET_MODEL = "OpenAI.GetModel"
COMPLETIONS = "OpenAI.Completions"
COMPLETIONS_STREAM = "OpenAI.CompletionsStream"
CHAT = "OpenAI.ChatCompletions"
CHAT_STREAM = "OpenAI.ChatCompletionsStream"
EMBEDDINGS = "OpenAI.Embeddings"
# What a request refused for its API key is counted as (before its body says whether it streams).
_LABELS = {
    "/v1/models": LIST_MODELS,
    "/v1/completions": COMPLETIONS,
    "/v1/chat/completions": CHAT,
    "/v1/embeddings": EMBEDDINGS,
}
OPEN_PATHS = frozenset({"/health"})
# How much of a body over --max-message-bytes is read (and dropped) before the 413 (see _Endpoint._read_json).
DISCARD_BYTES = 64 * 1024 * 1024

_FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}

# -- errors -------------------------------------------------------------------------------------------------


class RequestTooLarge(ServeError):
    """The request body is over `--max-message-bytes` (413)."""


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


# The gRPC code `status_of` gives an error, as an HTTP status and OpenAI's error `type` and `code`.
_HTTP_OF: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "server_overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
    grpc.StatusCode.INTERNAL: (500, "server_error", None),
}

# The core's field names, as OpenAI's parameters call them ("parameters.stop[1]" -> "stop[1]").
_PARAMS = {
    "parameters.max_new_tokens": "max_tokens",
    "parameters.temperature": "temperature",
    "parameters.top_p": "top_p",
    "parameters.top_k": "top_k",
    "parameters.repetition_penalty": "repetition_penalty",
    "parameters.stop": "stop",
    "texts": "input",
    "return_embedding": "model",
    "body": None,
}


def error_object(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass
class _Call(Call):
    """What one request learns as it runs (an RPC's `Call`), and how its body named `max_tokens`."""

    max_tokens_name: str = "max_tokens"


def _param(field: str, call: _Call) -> str | None:
    head, _, rest = field.partition("[")
    name = _PARAMS.get(head, head)
    if head == "parameters.max_new_tokens":
        name = call.max_tokens_name
    if name is None:
        return None
    return name + ("[" + rest if rest else "")


def _failure(exc: BaseException, call: _Call) -> tuple[grpc.StatusCode, int, dict]:
    """The metric code, HTTP status and OpenAI error object of `exc` (logged when unexpected)."""
    if isinstance(exc, RequestTooLarge):  # as gRPC's own refusal of a message over the limit
        body = error_object(str(exc), "invalid_request_error", code="request_too_large")
        return grpc.StatusCode.RESOURCE_EXHAUSTED, 413, body
    code, message = status_of(exc)
    _log_unexpected(call, exc)
    status, kind, error_code = _HTTP_OF.get(code, (500, "server_error", None))
    param = None
    if isinstance(exc, InvalidInput):
        param = _param(exc.field, call)
        problem = message.removeprefix(f"{exc.field}: ")
        message = f"{param}: {problem}" if param else problem
    return code, status, error_object(message, kind, param, error_code)


# -- the request body ---------------------------------------------------------------------------------------


class Body:
    """A request's JSON object, read field by field: a field of the wrong type raises InvalidInput naming
    it."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise InvalidInput("body", "must be a JSON object")
        self.data = data

    def get(self, name: str, kinds: type | tuple[type, ...], what: str) -> Any:
        value = self.data.get(name)
        if value is None:
            return None
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        # JSON's true is no number (Python's bool is an int).
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise InvalidInput(name, f"must be {what}")
        return value

    def string(self, name: str) -> str | None:
        return self.get(name, str, "a string")

    def integer(self, name: str) -> int | None:
        """An integer field; JSON allows thousands of digits: one past 64 bits is refused here, shortened in the
        message, for every field at once."""
        value = self.get(name, int, "an integer")
        if value is not None and not -(2**63) <= value < 2**64:
            raise InvalidInput(name, f"{shown_number(value)}, out of range")
        return value

    def number(self, name: str) -> float | None:
        value = self.get(name, (int, float), "a number")
        try:
            return None if value is None else float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise InvalidInput(name, f"{shown_number(value)}, out of range") from None

    def flag(self, name: str) -> bool:
        return bool(self.get(name, bool, "true or false"))

    def only(self, name: str, allowed: Iterable[Any], why: str) -> None:
        """Refuses a field this server does not honour, unless it holds a value that changes nothing."""
        value = self.data.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise InvalidInput(name, why)

    def stop(self) -> tuple[str, ...]:
        value = self.data.get("stop")
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return tuple(value)
        raise InvalidInput("stop", "must be a string or a list of strings")

    def stream_usage(self) -> bool:
        options = self.get("stream_options", dict, "an object")
        if not options:
            return False
        return bool(Body(options).get("include_usage", bool, "true or false"))


def _sampling(body: Body, call: _Call, logprobs: bool) -> SamplingParams:
    for name in ("presence_penalty", "frequency_penalty"):
        body.only(name, (0, 0.0), "not supported (only 0); use repetition_penalty")
    body.only("logit_bias", ({},), "not supported")
    body.only("n", (1,), "only 1 (one choice per request)")
    max_tokens = body.integer("max_completion_tokens")
    if max_tokens is not None:
        call.max_tokens_name = "max_completion_tokens"
    else:
        max_tokens = body.integer("max_tokens")
    seed = body.integer("seed")
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidInput("seed", f"{shown_number(seed)}, must be in 0..2**64-1")
    temperature = body.number("temperature")
    top_p = body.number("top_p")
    repetition_penalty = body.number("repetition_penalty")
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,  # OpenAI's default; 0 decodes greedily
        top_k=body.integer("top_k") or 0,  # not OpenAI's: vLLM's extension
        top_p=1.0 if top_p is None else top_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        seed=seed,
        stop=body.stop(),
        logprobs=logprobs,
    )


def _prompt(body: Body) -> str:
    prompt = body.data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidInput("prompt", "must be a string, or a list of one string (no batches, no token ids)")
    return prompt


def _content(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise InvalidInput(
                    f"{field}[{i}]", "only text parts ({'type': 'text', 'text': ...}) are supported"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidInput(field, "must be a string or a list of text parts")


def _messages(body: Body) -> tuple[tuple[str, str], ...]:
    raw = body.data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("messages", "a non-empty list of messages is required")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidInput(f"messages[{i}]", "must be an object with a string role and a content")
        if message.get("tool_calls"):
            raise InvalidInput(f"messages[{i}].tool_calls", "tools are not supported")
        role = message["role"]
        # OpenAI's newer name for the system role; chat templates know "system".
        messages.append(
            (
                "system" if role == "developer" else role,
                _content(message.get("content"), f"messages[{i}].content"),
            )
        )
    return tuple(messages)


def _texts(body: Body) -> tuple[str, ...]:
    value = body.data.get("input")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return tuple(value)
    raise InvalidInput("input", "must be a string or a non-empty list of strings (no token ids)")


# -- the answers --------------------------------------------------------------------------------------------


def _fingerprint(d: ModelDescription) -> str:
    """OpenAI's `system_fingerprint`: what the same seed's output depends on besides the request."""
    return f"nlpserve-{d.name}-v{d.version}-{d.variant}-{d.provider}"


def _usage(chunk: GenerationChunk) -> dict | None:
    if chunk.usage is None:
        return None
    u = chunk.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
    }


def _bytes(text: str) -> list[int] | None:
    return None if "\ufffd" in text else list(text.encode())


@dataclasses.dataclass
class _Answer:
    """What every chunk of one answer shares."""

    id: str
    object: str
    served: ServedModel
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def head(self) -> dict:
        d = self.served.description
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": d.name,
            "system_fingerprint": _fingerprint(d),
        }


class OpenAIFront:
    """The routes of the OpenAI-compatible API over `hub`; `app()` is the ASGI app for `http.HttpServer`."""

    def __init__(
        self,
        hub: ModelHub,
        metrics: Metrics,
        gate: Gate,
        *,
        max_body_bytes: int,
        unread_timeout: float,
        authorized: Callable[[str | None], bool] | None = None,
    ) -> None:
        self.hub = hub
        self.metrics = metrics
        self.gate = gate
        self.max_body_bytes = max_body_bytes
        self.unread_timeout = unread_timeout  # seconds a client may read nothing of its answer
        self.authorized = authorized  # the API key check (None: keys are off)
        self.serving = False  # /health: set by serve() once every model is ready, cleared when it stops
        self.created = int(time.time())

    def app(self) -> Any:
        def endpoint(method: str, handler: Callable, body: bool = True) -> _Endpoint:
            return _Endpoint(self, method, handler, body)

        routes = [
            Route("/health", _Asgi(self._health), methods=["GET"]),
            Route("/metrics", _Asgi(make_asgi_app(self.metrics.registry)), methods=["GET"]),
            Route("/v1/models", endpoint(LIST_MODELS, self.list_models, False), methods=["GET"]),
            Route("/v1/models/{model:path}", endpoint(GET_MODEL, self.get_model, False), methods=["GET"]),
            Route("/v1/completions", endpoint(COMPLETIONS, self.completions), methods=["POST"]),
            Route("/v1/chat/completions", endpoint(CHAT, self.chat_completions), methods=["POST"]),
            Route("/v1/embeddings", endpoint(EMBEDDINGS, self.embeddings), methods=["POST"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
        return app if self.authorized is None else _Keys(app, self)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = "SERVING" if self.serving else "NOT_SERVING"
        await JSONResponse({"status": status}, 200 if self.serving else 503)(scope, receive, send)

    # -- models

    def _model(self, served: ServedModel) -> dict:
        return {"id": served.name, "object": "model", "created": self.created, "owned_by": "nlpserve"}

    async def list_models(self, body: None, call: _Call, path: dict) -> dict:
        return {"object": "list", "data": [self._model(m) for m in self.hub.models.values()]}

    async def get_model(self, body: None, call: _Call, path: dict) -> dict:
        served = self.hub.get(path["model"])
        call.model = served.name
        return self._model(served)

    # -- completions

    async def completions(self, body: Body, call: _Call, path: dict) -> dict | AsyncIterator[dict]:
        stream = body.flag("stream")
        call.method = COMPLETIONS_STREAM if stream else COMPLETIONS
        served = self.hub.pick(body.string("model") or "", GENERATOR)
        call.model = served.name
        body.only("echo", (False,), "only false (the prompt is not echoed)")
        body.only("best_of", (1,), "only 1")
        body.only("suffix", ("",), "not supported")
        logprobs = body.integer("logprobs")
        if logprobs is not None and logprobs != 0:
            raise InvalidInput(
                "logprobs", f"{shown_number(logprobs)}: only 0 (the chosen token's logprob, no alternatives)"
            )
        prompt = _prompt(body)
        request = GenerateRequest(served.name, prompt, _sampling(body, call, logprobs is not None))
        answer = _Answer(f"cmpl-{uuid.uuid4().hex}", "text_completion", served)
        if stream:
            return self._completion_events(answer, request, len(prompt), body.stream_usage())
        chunk = await self.hub.generate(served, request, None)
        choice = self._completion_choice(answer, chunk, len(prompt))
        return {**answer.head(), "choices": [choice], "usage": _usage(chunk)}

    def _completion_choice(self, answer: _Answer, chunk: GenerationChunk, offset: int) -> dict:
        logprobs = None
        if chunk.logprobs is not None:
            tokens = self.hub.token_texts(answer.served, chunk.token_ids)
            offsets = []
            for token in tokens:
                offsets.append(offset)
                offset += len(token)
            logprobs = {
                "tokens": tokens,
                "token_logprobs": chunk.logprobs,
                "top_logprobs": None,
                "text_offset": offsets,
            }
        finish = _FINISH[chunk.finish] if chunk.finish is not None else None
        return {"index": 0, "text": chunk.text, "logprobs": logprobs, "finish_reason": finish}

    async def _completion_events(
        self, answer: _Answer, request: GenerateRequest, offset: int, include_usage: bool
    ) -> AsyncIterator[dict]:
        extra = {"usage": None} if include_usage else {}
        chunks = self.hub.generate_stream(answer.served, request, None)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield {**answer.head(), "choices": [self._completion_choice(answer, chunk, offset)], **extra}
                offset += len(chunk.text)
                if chunk.finish is not None and include_usage:
                    yield {**answer.head(), "choices": [], "usage": _usage(chunk)}

    # -- chat completions

    async def chat_completions(self, body: Body, call: _Call, path: dict) -> dict | AsyncIterator[dict]:
        stream = body.flag("stream")
        call.method = CHAT_STREAM if stream else CHAT
        served = self.hub.pick(body.string("model") or "", GENERATOR)
        call.model = served.name
        if not served.description.chat:
            raise InvalidInput(
                "model", f"{served.name} has no chat template: use /v1/completions with a prompt"
            )
        for name, allowed in (("tools", ([],)), ("functions", ([],)), ("tool_choice", ("none",))):
            body.only(name, allowed, "tools are not supported")
        body.only("response_format", ({"type": "text"},), "only {'type': 'text'}")
        logprobs = body.flag("logprobs")
        top = body.integer("top_logprobs")
        if top is not None and top != 0:
            raise InvalidInput(
                "top_logprobs", f"{shown_number(top)}: only 0 (the chosen token's logprob, no alternatives)"
            )
        request = GenerateRequest(served.name, "", _sampling(body, call, logprobs), _messages(body))
        answer = _Answer(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", served)
        if stream:
            answer.object = "chat.completion.chunk"
            return self._chat_events(answer, request, body.stream_usage())
        chunk = await self.hub.generate(served, request, None)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": chunk.text, "refusal": None},
            "logprobs": self._chat_logprobs(answer, chunk),
            "finish_reason": _FINISH[chunk.finish],
        }
        return {**answer.head(), "choices": [choice], "usage": _usage(chunk)}

    def _chat_logprobs(self, answer: _Answer, chunk: GenerationChunk) -> dict | None:
        if chunk.logprobs is None:
            return None
        tokens = self.hub.token_texts(answer.served, chunk.token_ids)
        content = [
            {"token": t, "logprob": lp, "bytes": _bytes(t), "top_logprobs": []}
            for t, lp in zip(tokens, chunk.logprobs)
        ]
        return {"content": content, "refusal": None}

    async def _chat_events(
        self, answer: _Answer, request: GenerateRequest, include_usage: bool
    ) -> AsyncIterator[dict]:
        extra = {"usage": None} if include_usage else {}
        chunks = self.hub.generate_stream(answer.served, request, None)
        first = True
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                first = False
                if chunk.text or "role" in delta:
                    delta["content"] = chunk.text
                choice = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": self._chat_logprobs(answer, chunk),
                    "finish_reason": _FINISH[chunk.finish] if chunk.finish is not None else None,
                }
                yield {**answer.head(), "choices": [choice], **extra}
                if chunk.finish is not None and include_usage:
                    yield {**answer.head(), "choices": [], "usage": _usage(chunk)}

    # -- embeddings

    async def embeddings(self, body: Body, call: _Call, path: dict) -> dict:
        name = body.string("model") or ""
        # A classifier with an embedding output embeds too (its pooled vector); anything else is refused by
        # pick as "not an embedder".
        kind = CLASSIFIER if name and self.hub.get(name).description.kind == CLASSIFIER else EMBEDDER
        served = self.hub.pick(name, kind)
        call.model = served.name
        encoding = body.string("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise InvalidInput("encoding_format", f"{shown(encoding)}: must be 'float' or 'base64'")
        dimensions = body.integer("dimensions")
        if dimensions is not None and dimensions < 1:
            raise InvalidInput("dimensions", f"{shown_number(dimensions)}, must be 1 or more")
        texts = _texts(body)
        if kind == EMBEDDER:
            result = await self.hub.embed(
                served, EmbedRequest(served.name, texts, dimensions=dimensions or 0), None
            )
            vectors = [(e.values, e.num_tokens) for e in result.embeddings]
        else:
            size = served.description.embedding_size
            if dimensions is not None and dimensions != size:
                raise InvalidInput(
                    "dimensions",
                    f"{dimensions}: model {served.name} is a classifier, its vectors have {size}",
                )
            result = await self.hub.classify(
                served, ClassifyRequest(served.name, texts, return_embedding=True), None
            )
            vectors = [(r.embedding or [], r.num_tokens) for r in result.results]
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(values, encoding)}
            for i, (values, _) in enumerate(vectors)
        ]
        tokens = sum(n for _, n in vectors)
        return {
            "object": "list",
            "data": data,
            "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _encoded(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


# -- the ASGI side ------------------------------------------------------------------------------------------


class _Asgi:
    """A plain ASGI callable as a Starlette route (a function would be taken for a request handler)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error object."""
    assert isinstance(exc, HTTPException)
    message = f"{exc.detail}: {request.method} {shown(request.url.path)}"
    return JSONResponse(
        error_object(message, "invalid_request_error"), exc.status_code, headers=dict(exc.headers or {})
    )


class _Keys:
    """Every route but /health needs `Authorization: Bearer KEY` (security.py's check, the same answer for
    every path, known or not); a refusal is 401 in OpenAI's error object, counted for known routes."""

    def __init__(self, app: Any, front: OpenAIFront) -> None:
        self.app = app
        self.front = front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.front.authorized(_header(scope, b"authorization")):
            return await self.app(scope, receive, send)
        if scope["path"] in _LABELS:
            self.front.metrics.requests.labels("", _LABELS[scope["path"]], "UNAUTHENTICATED").inc()
        body = error_object(UNAUTHENTICATED_MESSAGE, "invalid_request_error", None, "invalid_api_key")
        await JSONResponse(body, 401, headers={"www-authenticate": "Bearer"})(scope, receive, send)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnected(work: Awaitable[Any], receive: Receive) -> Any:
    """`work`'s result; or, when the client disconnects first, `work` cancelled (and waited for: its streams
    are closed, their sequences cancelled) and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server stops: the work goes too
        task.cancel()
        watch.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
        raise
    watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone


_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # a proxy (nginx) passes each event on at once
]


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class _Endpoint:
    """One route: the body read within the size limit, admission (the drain's Gate), the handler, its answer
    (JSON, or server-sent events for a stream), the error mapping and the request metrics, in one place.

    A handler ``f(body, call, path_params)`` returns a dict (the JSON answer) or an async iterator of dicts
    (the events of a stream). A stream's first event is computed before the 200 goes out, so an error before it (a
    bad parameter, a full queue) gets its own HTTP status; an error after it is a last `data: {"error": ...}`
    event, without `data: [DONE]`.
    """

    def __init__(self, front: OpenAIFront, method: str, handler: Callable, body: bool) -> None:
        self.front = front
        self.method = method
        self.handler = handler
        self.takes_body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.front
        started = time.monotonic()
        call = _Call(self.method)
        code = grpc.StatusCode.CANCELLED  # unless it gets further
        admitted = False
        try:
            try:
                body = Body(await self._read_json(scope, receive)) if self.takes_body else None
                admitted = front.gate.enter()
            except ClientGone:
                raise
            except Exception as exc:  # noqa: BLE001 - the one mapping of errors to HTTP statuses
                code, status, error = _failure(exc, call)
                await self._send_json(send, status, error)
                return
            code = await _until_disconnected(self._answer(body, call, scope, send), receive)
        except ClientGone:
            code = grpc.StatusCode.CANCELLED
        except TimeoutError:
            log.info(
                "%s (model %r): the client read nothing for %gs; the answer ends",
                self.method,
                call.model,
                front.unread_timeout,
            )
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            if admitted:
                front.gate.leave()
            _finish(front.metrics, call, code, started)

    async def _answer(self, body: Body | None, call: _Call, scope: Scope, send: Send) -> grpc.StatusCode:
        events: AsyncIterator[dict] | None = None
        try:
            result = await self.handler(body, call, scope.get("path_params", {}))
            if not isinstance(result, dict):
                events = result
                first = await anext(events)
        except Exception as exc:  # noqa: BLE001 - the one mapping of errors to HTTP statuses
            if events is not None:
                await events.aclose()
            code, status, error = _failure(exc, call)
            await self._send_json(send, status, error)
            return code
        if events is None:
            await self._send_json(send, 200, result)
            return grpc.StatusCode.OK
        # aclosing: when the client goes away (this task cancelled) while the stream waits at a `yield`, the
        # inner generators close now and cancel their sequence, not whenever the garbage collector runs.
        async with contextlib.aclosing(events):
            await self._write(send, _start(200, _SSE_HEADERS))
            event = first
            while True:
                await self._write(send, _part(b"data: " + _json(event) + b"\n\n", more=True))
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - in the stream: its last event
                    code, _, error = _failure(exc, call)
                    await self._write(send, _part(b"data: " + _json(error) + b"\n\n"))
                    return code
            await self._write(send, _part(b"data: [DONE]\n\n"))
        return grpc.StatusCode.OK

    async def _send_json(self, send: Send, status: int, value: Any) -> None:
        await self._write(send, _start(status, _JSON_HEADERS))
        await self._write(send, _part(_json(value)))

    async def _write(self, send: Send, message: dict) -> None:
        # A client that reads nothing fills the socket's buffers and the write waits: past the unread timeout
        # the answer ends (TimeoutError), so that it holds neither a sequence slot nor the drain.
        async with asyncio.timeout(self.front.unread_timeout):
            await send(message)

    async def _read_json(self, scope: Scope, receive: Receive) -> Any:
        limit = self.front.max_body_bytes
        length = _header(scope, b"content-length")
        too_large = length is not None and length.isdigit() and int(length) > limit
        body, discarded, more = bytearray(), 0, True
        # A body over the limit is still read to its end (up to DISCARD_BYTES), not answered mid-upload: the
        # connection would then close with unread data, and the client, still sending, would see a reset
        # instead of the 413.
        while more and discarded <= DISCARD_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            part, more = message.get("body", b""), message.get("more_body", False)
            if too_large:
                discarded += len(part)
                continue
            body += part
            if len(body) > limit:
                too_large, discarded = True, len(body)
                body.clear()
        if too_large:
            size = f"of {int(length)} bytes " if length is not None and length.isdigit() else ""
            raise RequestTooLarge(f"the request body {size}is over the limit of {limit} bytes")
        return loads_json(body, "body")


def _start(status: int, headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http.response.start", "status": status, "headers": headers}


def _part(body: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": body, "more_body": more}
