"""The Open Inference Protocol (KServe v2) front, as Triton Inference Server speaks it over gRPC
(`inference.GRPCInferenceService`, protos/inference/grpc_service.proto), on the same port and the same
`ModelHub` as nlpserve.v1: requests from both fronts share the same batches and decode steps.

Thin handlers: tensors in, domain requests to the core, results back to tensors (kserve_tensors.py);
errors are mapped in status.py, as for nlpserve.v1 (an error in a stream goes in its `error_message`).
The tensor contract of each model kind is `signature()`; docs/server.md lists it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from ..batching import WorkTimes
from ..errors import InvalidInput, ModelNotFound, loads_json, shown, shown_number
from ..metrics import Metrics
from ..models import ModelHub, ServedModel
from ..repository import CLASSIFIER, EMBEDDER, GENERATOR, TOKEN_CLASSIFIER
from ..types import (
    AGGREGATIONS,
    ClassifyRequest,
    EmbedRequest,
    GenerateRequest,
    GenerationChunk,
    ModelDescription,
    SamplingParams,
    TokenClassifyRequest,
)
from . import kserve_tensors as t
from .kserve_stats import RequestTimes, Statistics
from .oip import grpc_service_pb2 as pb
from .status import Call, Gate, bidi, unary

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVER_NAME = "nlpserve"
# The protocol extensions served (Triton's names; perf_analyzer asks for statistics only when listed).
EXTENSIONS = ("model_configuration", "parameters", "statistics")
# Triton's response and request parameters for decoupled streaming.
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"


@functools.cache
def _server_version() -> str:
    try:
        return importlib.metadata.version("nlpserve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


# ------------------------------------------------------------------------------------------------------------
# The tensors of each model kind


@dataclass(frozen=True, slots=True)
class Spec:
    """One tensor of a model's signature; `dims` without the batch dimension, -1 for any size."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False


TEXT = Spec("text", t.BYTES, (1,))  # [N] or [N, 1]
# Classifiers and embedders also take token ids instead of text (one of the two): the tensors of the graph,
# [N, T], rows padded where attention_mask is 0.
TOKEN_INPUTS = (
    Spec("text", t.BYTES, (1,), True),
    Spec("input_ids", "INT64", (-1,), True),
    Spec("attention_mask", "INT64", (-1,), True),
    Spec("token_type_ids", "INT64", (-1,), True),
)
TOKEN_TENSORS = ("input_ids", "attention_mask", "token_type_ids")
# Generators: the names of Triton's TensorRT-LLM and vLLM backends (what genai-perf and their clients send).
GENERATOR_INPUTS = (
    Spec("text_input", t.BYTES, (1,)),
    Spec("max_tokens", "INT32", (1,), True),
    Spec("stream", "BOOL", (1,), True),
    Spec("temperature", "FP32", (1,), True),
    Spec("top_k", "INT32", (1,), True),
    Spec("top_p", "FP32", (1,), True),
    Spec("repetition_penalty", "FP32", (1,), True),
    Spec("seed", "UINT64", (1,), True),
    Spec("random_seed", "UINT64", (1,), True),  # TensorRT-LLM's name of seed
    Spec("stop", t.BYTES, (-1,), True),
    Spec("stop_words", t.BYTES, (-1,), True),  # TensorRT-LLM's name of stop
    Spec("exclude_input_in_output", "BOOL", (1,), True),
    Spec("sampling_parameters", t.BYTES, (1,), True),  # vLLM's: a JSON object
)
TEXT_OUTPUT = Spec("text_output", t.BYTES, (1,))


def signature(d: ModelDescription) -> tuple[tuple[Spec, ...], tuple[Spec, ...]]:
    """The inputs and outputs of a model of this description."""
    if d.kind == GENERATOR:
        return GENERATOR_INPUTS, (TEXT_OUTPUT,)
    if d.kind == CLASSIFIER:
        outputs = [Spec("label", t.BYTES, ()), Spec("probabilities", "FP32", (len(d.labels),))]
        if d.embedding_size:
            outputs.append(Spec("embedding", "FP32", (d.embedding_size,)))
        return TOKEN_INPUTS, tuple(outputs)
    if d.kind == EMBEDDER:
        return TOKEN_INPUTS, (Spec("embedding", "FP32", (d.embedding_size,)),)
    return (TEXT,), (Spec("entities", t.BYTES, ()),)  # token classifiers: a JSON array per text


def max_batch_size(d: ModelDescription) -> int:
    """The most items in a request's first dimension: texts for an encoder, one prompt for a generator."""
    return 1 if d.kind == GENERATOR else d.max_texts_per_request


# Outputs sent when a request names none.
DEFAULT_OUTPUTS = {
    CLASSIFIER: ("label", "probabilities"),
    EMBEDDER: ("embedding",),
    TOKEN_CLASSIFIER: ("entities",),
    GENERATOR: ("text_output",),
}


# ------------------------------------------------------------------------------------------------------------
# The core's field names as this protocol's tensor names, in its errors

_FIELDS = [
    (re.compile(r"texts(?=\[|$)"), "text"),
    (re.compile(r"^prompt$"), "text_input"),
    (re.compile(r"^parameters\.max_new_tokens$"), "max_tokens"),
    (re.compile(r"^parameters\."), ""),
    (re.compile(r"^return_embedding$"), "outputs"),
]


@contextlib.contextmanager
def _tensor_names() -> Iterator[None]:
    """Re-raises the core's InvalidInput with the field as the client named it (`texts[2]` -> `text[2]`)."""
    try:
        yield
    except InvalidInput as exc:
        name = exc.field
        for pattern, replacement in _FIELDS:
            name = pattern.sub(replacement, name)
        if name == exc.field:
            raise
        raise InvalidInput(name, str(exc).removeprefix(f"{exc.field}: ")) from None


# ------------------------------------------------------------------------------------------------------------
# Requests: tensors and parameters -> domain requests


def _inputs(served: ServedModel, request: pb.ModelInferRequest) -> dict[str, t.Tensor]:
    """The request's tensors, every one known to the model and every required one present."""
    inputs, _ = signature(served.description)
    tensors = t.read_inputs(request)
    known = {s.name for s in inputs}
    for name in tensors:
        if name in TOKEN_TENSORS and served.description.kind == TOKEN_CLASSIFIER:
            raise InvalidInput(
                name, "token-id inputs are not supported by token classifiers (entities are spans of the text); "
                "send the BYTES tensor text"
            )
        if name not in known:
            raise InvalidInput(
                t.named(name),
                f"not an input of model {served.name} (it takes {', '.join(s.name for s in inputs)})",
            )
    for spec in inputs:
        if not spec.optional and spec.name not in tensors:
            raise InvalidInput(spec.name, f"missing: model {served.name} requires it ({spec.datatype})")
    if inputs is TOKEN_INPUTS:
        if ("text" in tensors) == ("input_ids" in tensors):
            raise InvalidInput(
                "text", "send either text (BYTES) or input_ids (INT64, with attention_mask) to model "
                f"{served.name}, not {'both' if 'text' in tensors else 'neither'}"
            )
        stray = [n for n in ("attention_mask", "token_type_ids") if n in tensors and "input_ids" not in tensors]
        if stray:
            raise InvalidInput(stray[0], "goes with input_ids")
    return tensors


def _outputs(served: ServedModel, request: pb.ModelInferRequest) -> tuple[str, ...]:
    """The outputs asked for (in their order), or the kind's default ones."""
    if not request.outputs:
        return DEFAULT_OUTPUTS[served.description.kind]
    _, outputs = signature(served.description)
    known = [s.name for s in outputs]
    names = []
    for output in request.outputs:
        if output.name not in known:
            raise InvalidInput(
                "outputs",
                f"{shown(output.name)} is not an output of model {served.name} ({', '.join(known)})",
            )
        if output.name not in names:
            names.append(output.name)
    return tuple(names)


def _param(request: pb.ModelInferRequest, name: str, kind: type) -> Any:
    """A request parameter of the given Python type (None when absent)."""
    if name not in request.parameters:
        return None
    value = t.parameter(request.parameters[name])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"parameters.{t.named(name)}", f"expected a {kind.__name__} parameter")
    return value


@dataclass(frozen=True, slots=True)
class EncoderCall:
    texts: tuple[str, ...]  # with token ids: one empty placeholder per row
    outputs: tuple[str, ...]
    no_truncation: bool
    dimensions: int
    aggregation: str
    token_ids: tuple[tuple[int, ...], ...] = ()
    token_type_ids: tuple[tuple[int, ...], ...] = ()


def token_rows(tensors: dict[str, t.Tensor]) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """input_ids [N, T] (INT64 or INT32) as N rows of ids, each keeping the positions its attention_mask marks 1
    (any padding side; all of them without a mask); token_type_ids likewise."""
    ids_tensor = tensors["input_ids"]
    t.expect(ids_tensor, "INT64", "INT32")
    if len(ids_tensor.shape) != 2:
        raise InvalidInput("input_ids", f"shape {list(ids_tensor.shape)}, expected [N, T]")
    shape = ids_tensor.shape
    if shape[0] == 0:
        raise InvalidInput("input_ids", "no rows")
    ids = np.asarray(ids_tensor.data, dtype=np.int64).reshape(shape)

    def like_ids(name: str) -> np.ndarray | None:
        """The tensor `name` (INT64 or INT32, the shape of input_ids) as an array; None when not sent."""
        if name not in tensors:
            return None
        tensor = tensors[name]
        t.expect(tensor, "INT64", "INT32")
        if tuple(tensor.shape) != tuple(shape):
            raise InvalidInput(name, f"shape {list(tensor.shape)}, expected that of input_ids {list(shape)}")
        return np.asarray(tensor.data, dtype=np.int64).reshape(shape)

    mask = like_ids("attention_mask")
    if mask is not None and not np.isin(mask, (0, 1)).all():
        raise InvalidInput("attention_mask", "values must be 0 or 1")
    keep = np.ones(shape, dtype=bool) if mask is None else mask == 1
    type_ids = like_ids("token_type_ids")
    types: tuple[tuple[int, ...], ...] = ()
    if type_ids is not None:
        types = tuple(tuple(row[k].tolist()) for row, k in zip(type_ids, keep))
    rows = tuple(tuple(row[k].tolist()) for row, k in zip(ids, keep))
    return rows, types


def encoder_call(served: ServedModel, request: pb.ModelInferRequest) -> EncoderCall:
    tensors = _inputs(served, request)
    aggregation = _param(request, "aggregation", str) or "simple"
    if aggregation not in AGGREGATIONS.values():
        raise InvalidInput(
            "parameters.aggregation", f"{shown(aggregation)}, one of none, simple, first, average, max"
        )
    token_ids, token_type_ids = token_rows(tensors) if "input_ids" in tensors else ((), ())
    return EncoderCall(
        texts=("",) * len(token_ids) if "input_ids" in tensors else tuple(t.texts(tensors["text"])),
        outputs=_outputs(served, request),
        no_truncation=bool(_param(request, "no_truncation", bool)),
        dimensions=_param(request, "dimensions", int) or 0,
        aggregation=aggregation,
        token_ids=token_ids,
        token_type_ids=token_type_ids,
    )


# Generation settings: how each is read from a tensor, and its Python type as a parameter or in
# sampling_parameters. Aliases (TensorRT-LLM's names) set the same setting.
_SETTINGS = {
    "max_tokens": (t.integer, int),
    "temperature": (t.number, float),
    "top_k": (t.integer, int),
    "top_p": (t.number, float),
    "repetition_penalty": (t.number, float),
    "seed": (t.integer, int),
    "stop": (t.strings, list),
    "stream": (t.boolean, bool),
    "exclude_input_in_output": (t.boolean, bool),
}
_ALIASES = {"random_seed": "seed", "stop_words": "stop"}
# vLLM's sampling_parameters keys read here (its values may be strings: genai-perf writes "max_tokens": "256").
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop")


@dataclass(frozen=True, slots=True)
class GenerationCall:
    request: GenerateRequest
    stream: bool | None  # None: not said
    prepend_prompt: bool  # exclude_input_in_output false: the whole text starts with the prompt


def generation_call(served: ServedModel, request: pb.ModelInferRequest) -> GenerationCall:
    tensors = _inputs(served, request)
    _outputs(served, request)
    prompt = t.texts(tensors["text_input"])
    if len(prompt) != 1:
        raise InvalidInput("text_input", f"{len(prompt)} prompts, one per request ([1] or [1, 1])")
    settings: dict[str, tuple[str, Any]] = {}

    def put(setting: str, source: str, value: Any) -> None:
        if setting in settings:
            raise InvalidInput(source, f"sets {setting}, already set by {settings[setting][0]}")
        settings[setting] = (source, value)

    for name, tensor in tensors.items():
        setting = _ALIASES.get(name, name)
        if setting in _SETTINGS:
            put(setting, name, _SETTINGS[setting][0](tensor))
    if "sampling_parameters" in tensors:
        for key, value in _sampling_parameters(tensors["sampling_parameters"]).items():
            put(key, f"sampling_parameters.{key}", value)
    for name in request.parameters:  # others (triton_*, a backend's own) are not this server's
        setting = _ALIASES.get(name, name)
        if setting in _SETTINGS:
            kind = _SETTINGS[setting][1]
            value = _param(request, name, str if kind is list else kind)
            put(setting, f"parameters.{name}", [value] if kind is list else value)
    value = {k: v for k, (_, v) in settings.items()}
    if value.get("seed", 0) < 0:  # nlpserve.v1's seed is a uint64; numpy refuses negative seeds
        raise InvalidInput(settings["seed"][0], f"{shown_number(value['seed'])}, must be 0 or more")
    params = SamplingParams(
        max_new_tokens=value.get("max_tokens"),
        temperature=value.get("temperature", 0.0),
        top_k=value.get("top_k", 0),
        top_p=value.get("top_p", 1.0),
        repetition_penalty=value.get("repetition_penalty", 1.0),
        seed=value.get("seed"),
        stop=tuple(s for s in value.get("stop", ()) if s),  # TensorRT-LLM clients send [""] for none
    )
    return GenerationCall(
        GenerateRequest(served.name, prompt[0], params),
        stream=value.get("stream"),
        prepend_prompt=value.get("exclude_input_in_output") is False,
    )


def _sampling_parameters(tensor: t.Tensor) -> dict[str, Any]:
    """vLLM's sampling_parameters: one JSON object (values as numbers or as strings of numbers)."""
    (text,) = t.strings(tensor) if len(tensor) == 1 else (None,)
    parsed = loads_json(text, "sampling_parameters") if text is not None else None
    if not isinstance(parsed, dict):
        raise InvalidInput("sampling_parameters", "expected one JSON object")
    values: dict[str, Any] = {}
    for key, value in parsed.items():
        if key not in _SAMPLING_KEYS:
            raise InvalidInput(
                f"sampling_parameters.{t.named(key)}",
                f"not supported (supported: {', '.join(_SAMPLING_KEYS)})",
            )
        kind = _SETTINGS[key][1]
        try:
            if kind is list:
                value = [value] if isinstance(value, str) else [str(v) for v in value]
            elif isinstance(value, bool):
                raise ValueError
            else:
                value = kind(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int() of 1e400
            raise InvalidInput(
                f"sampling_parameters.{key}", f"{shown(str(value))}, expected a {kind.__name__}"
            ) from None
        values[key] = value
    return values


# ------------------------------------------------------------------------------------------------------------
# Results -> response tensors


def _response(served: ServedModel, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=served.name, model_version=served.description.version, id=request.id
    )


def _encoder_outputs(
    response: pb.ModelInferResponse, outputs: tuple[str, ...], kind: str, result: Any
) -> None:
    """A classify, embed or classify-tokens result as the output tensors asked for."""
    if kind == EMBEDDER:
        vectors = np.asarray([e.values for e in result.embeddings], dtype=np.float32)
        t.add_output(response, "embedding", "FP32", vectors.shape, vectors)
        return
    rows = result.results
    for name in outputs:
        if name == "label":
            t.add_output(response, name, t.BYTES, [len(rows)], [r.label.encode() for r in rows])
        elif name == "probabilities":
            probabilities = np.asarray([r.probabilities for r in rows], dtype=np.float32)
            t.add_output(response, name, "FP32", probabilities.shape, probabilities)
        elif name == "embedding":
            vectors = np.asarray([r.embedding for r in rows], dtype=np.float32)
            t.add_output(response, name, "FP32", vectors.shape, vectors)
        elif name == "entities":
            entities = [json.dumps([_entity(e) for e in r.entities]).encode() for r in rows]
            t.add_output(response, name, t.BYTES, [len(rows)], entities)


def _entity(e: Any) -> dict[str, Any]:
    return {"label": e.label, "score": e.score, "start": e.start, "end": e.end, "text": e.text}


def _text_output(response: pb.ModelInferResponse, text: str, shape: tuple[int, ...]) -> None:
    t.add_output(response, TEXT_OUTPUT.name, t.BYTES, shape, [text.encode()])


def _flagged(response: pb.ModelInferResponse, final: bool) -> pb.ModelStreamInferResponse:
    response.parameters[FINAL].bool_param = final
    return pb.ModelStreamInferResponse(infer_response=response)


def _stream_error(request: pb.ModelInferRequest | None, message: str) -> pb.ModelStreamInferResponse:
    """A failed request's answer in ModelStreamInfer: its error and id (Triton's form), final."""
    response = pb.ModelInferResponse(
        model_name=request.model_name if request is not None else "",
        model_version=request.model_version if request is not None else "",
        id=request.id if request is not None else "",
    )
    response.parameters[FINAL].bool_param = True
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)


# ------------------------------------------------------------------------------------------------------------
# The servicer


class KServeServicer:
    def __init__(self, hub: ModelHub, metrics: Metrics, gate: Gate, unread_timeout: float) -> None:
        self.hub = hub
        self.metrics = metrics
        self.gate = gate
        self.unread_timeout = unread_timeout  # seconds a stream's client may read nothing
        self.stats = Statistics()

    def _model(self, name: str, version: str) -> ServedModel:
        """The model named (NOT_FOUND when unknown or not in that version; UNAVAILABLE while loading)."""
        served = self.hub.get(name)
        if version and version != served.description.version:
            raise ModelNotFound(
                f"model {shown(name)} has no version {shown(version)} (version {served.description.version} is served)"
            )
        return served

    def _ready(self, request: pb.ModelInferRequest, call: Call) -> tuple[ServedModel, RequestTimes]:
        served = self._model(request.model_name, request.model_version)
        served = self.hub.pick(served.name, served.description.kind)  # UNAVAILABLE unless ready
        call.model = served.name
        times = self.stats.start(served.name, served.description.version)
        call.on_finish = times.finish
        return served, times

    # -- health and metadata -------------------------------------------------------------------------------

    @unary("ServerLive", pb.ServerLiveRequest, gated=False)  # answered during a drain
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        return pb.ServerLiveResponse(live=True)

    @unary("ServerReady", pb.ServerReadyRequest, gated=False)  # answered during a drain
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        return pb.ServerReadyResponse(ready=self.hub.all_ready and not self.gate.stopping)

    @unary("ModelReady", pb.ModelReadyRequest, gated=False)  # answered during a drain
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        if request.name in self.hub.loading:
            return pb.ModelReadyResponse(ready=False)
        served = self._model(request.name, request.version)
        call.model = served.name
        return pb.ModelReadyResponse(ready=served.ready and not self.gate.stopping)

    @unary("ServerMetadata", pb.ServerMetadataRequest)
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS)

    @unary("ModelMetadata", pb.ModelMetadataRequest)
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        served = self._model(request.name, request.version)
        call.model = served.name
        d = served.description
        inputs, outputs = signature(d)
        batch = (-1,) if max_batch_size(d) > 0 else ()
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=d.name,
            versions=[d.version],
            platform=f"{SERVER_NAME}_{d.kind}",
            inputs=[meta(name=s.name, datatype=s.datatype, shape=batch + s.dims) for s in inputs],
            outputs=[meta(name=s.name, datatype=s.datatype, shape=batch + s.dims) for s in outputs],
        )

    @unary("ModelConfig", pb.ModelConfigRequest)
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        served = self._model(request.name, request.version)
        call.model = served.name
        d = served.description
        inputs, outputs = signature(d)
        config = pb.ModelConfig(
            name=d.name,
            platform=f"{SERVER_NAME}_{d.kind}",
            backend=SERVER_NAME,
            max_batch_size=max_batch_size(d),
            input=[
                pb.ModelInput(
                    name=s.name, data_type=t.CONFIG_TYPES[s.datatype], dims=s.dims, optional=s.optional
                )
                for s in inputs
            ],
            output=[
                pb.ModelOutput(name=s.name, data_type=t.CONFIG_TYPES[s.datatype], dims=s.dims)
                for s in outputs
            ],
            instance_group=[
                pb.ModelInstanceGroup(
                    count=1,
                    kind=pb.ModelInstanceGroup.KIND_CPU
                    if d.provider == "CPUExecutionProvider"
                    else pb.ModelInstanceGroup.KIND_GPU,
                )
            ],
        )
        parameters = {
            "kind": d.kind,
            "execution_provider": d.provider,
            "variant": d.variant,
            "max_sequence_length": d.max_sequence_length,
            "batch_policy": d.policy,
        }
        if d.kind == GENERATOR:
            config.model_transaction_policy.decoupled = True
            parameters.update(
                max_active_sequences=d.max_active_sequences,
                max_new_tokens=d.max_new_tokens,
                default_max_new_tokens=d.default_max_new_tokens,
                kv_cache_tokens=d.kv_cache_tokens,
            )
        else:
            config.dynamic_batching.preferred_batch_size.append(d.max_batch_size)
            config.dynamic_batching.max_queue_delay_microseconds = round(d.max_queue_delay_ms * 1000)
            config.dynamic_batching.default_queue_policy.max_queue_size = d.max_queue_size
        if d.labels:
            parameters["labels"] = ",".join(d.labels)
        for key, value in parameters.items():
            config.parameters[key].string_value = str(value)
        return pb.ModelConfigResponse(config=config)

    @unary("ModelStatistics", pb.ModelStatisticsRequest)
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        if request.name:
            served = self._model(request.name, request.version)
            call.model = served.name
            chosen = [served]
        else:
            chosen = list(self.hub.models.values())
        response = pb.ModelStatisticsResponse()
        for served in chosen:
            c = self.stats.of(served.name, served.description.version)
            d = pb.StatisticDuration
            response.model_stats.add(
                name=served.name,
                version=c.version,
                last_inference=c.last_inference_ms,
                inference_count=c.inference_count,
                execution_count=c.execution_count,
                inference_stats=pb.InferStatistics(
                    success=d(count=c.success.count, ns=c.success.ns),
                    fail=d(count=c.fail.count, ns=c.fail.ns),
                    queue=d(count=c.queue.count, ns=c.queue.ns),
                    compute_input=d(count=c.compute_input.count, ns=c.compute_input.ns),
                    compute_infer=d(count=c.compute_infer.count, ns=c.compute_infer.ns),
                    compute_output=d(count=c.compute_output.count, ns=c.compute_output.ns),
                ),
            )
        return response

    @unary("RepositoryIndex", pb.RepositoryIndexRequest)
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        index = pb.RepositoryIndexResponse.ModelIndex
        models = []
        for served in self.hub.models.values():
            state, reason = ("READY", "") if served.ready else ("UNAVAILABLE", "not serving")
            models.append(
                index(name=served.name, version=served.description.version, state=state, reason=reason)
            )
        models += [index(name=name, state="LOADING") for name in sorted(self.hub.loading)]
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return pb.RepositoryIndexResponse(models=models)

    # -- inference -----------------------------------------------------------------------------------------

    @unary("ModelInfer", pb.ModelInferRequest)
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        served, times = self._ready(request, call)
        if served.description.kind == GENERATOR:
            started = time.monotonic()
            gen = generation_call(served, request)
            times.input_seconds = time.monotonic() - started
            with _tensor_names():
                chunk = await self.hub.generate(served, gen.request, call.deadline)
            started = time.monotonic()
            text = gen.request.prompt + chunk.text if gen.prepend_prompt else chunk.text
            response = _response(served, request)
            _text_output(response, text, tuple(request_shape(request, "text_input")))
            self._generated(times, chunk, time.monotonic() - started)
            return response
        return await self._encode(served, request, call, times)

    @bidi("ModelStreamInfer", pb.ModelInferRequest, _stream_error)
    async def ModelStreamInfer(
        self, request: Any, context: grpc.aio.ServicerContext, call: Call
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        served, times = self._ready(request, call)
        if served.description.kind != GENERATOR:
            yield _flagged(await self._encode(served, request, call, times), True)
            return
        started = time.monotonic()
        gen = generation_call(served, request)
        times.input_seconds = time.monotonic() - started
        empty_final = _param(request, EMPTY_FINAL, bool) is True
        shape = tuple(request_shape(request, "text_input"))
        if gen.stream is False:  # one response with the whole text, as those backends do
            with _tensor_names():
                chunk = await self.hub.generate(served, gen.request, call.deadline)
            started = time.monotonic()
            response = _response(served, request)
            _text_output(
                response, gen.request.prompt + chunk.text if gen.prepend_prompt else chunk.text, shape
            )
            self._generated(times, chunk, time.monotonic() - started)
            yield _flagged(response, not empty_final)
        else:
            chunks = self.hub.generate_stream(served, gen.request, call.deadline)
            output_seconds = 0.0
            with _tensor_names():
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        last = chunk.finish is not None
                        final = last and not empty_final  # else the empty final response follows
                        message = None
                        if chunk.text or final:  # a piece without text (held back, an EOS) is not sent
                            started = time.monotonic()
                            response = _response(served, request)
                            _text_output(response, chunk.text, shape)
                            message = _flagged(response, final)
                            output_seconds += time.monotonic() - started
                        if last:
                            self._generated(times, chunk, output_seconds)
                        if message is not None:
                            yield message
        if empty_final:  # Triton's empty final response: no outputs, only the flag
            yield _flagged(_response(served, request), True)

    async def _encode(
        self, served: ServedModel, request: pb.ModelInferRequest, call: Call, times: RequestTimes
    ) -> pb.ModelInferResponse:
        """ModelInfer on an encoder (classifier, embedder, token classifier)."""
        started = time.monotonic()
        enc = encoder_call(served, request)
        times.input_seconds = time.monotonic() - started
        kind, work = served.description.kind, WorkTimes()
        with _tensor_names():
            if kind == CLASSIFIER:
                wants = "embedding" in enc.outputs
                classify = ClassifyRequest(
                    served.name, enc.texts, wants, enc.no_truncation, enc.token_ids, enc.token_type_ids
                )
                result = await self.hub.classify(served, classify, call.deadline, work)
            elif kind == EMBEDDER:
                embed = EmbedRequest(
                    served.name, enc.texts, enc.no_truncation, enc.dimensions, enc.token_ids, enc.token_type_ids
                )
                result = await self.hub.embed(served, embed, call.deadline, work)
            else:
                tokens = TokenClassifyRequest(served.name, enc.texts, enc.aggregation, enc.no_truncation)
                result = await self.hub.classify_tokens(served, tokens, call.deadline, work)
        started = time.monotonic()
        response = _response(served, request)
        _encoder_outputs(response, enc.outputs, kind, result)
        times.output_seconds = time.monotonic() - started
        times.queue_seconds, times.compute_seconds = work.queue_seconds, work.compute_seconds
        times.batches, times.inferences = work.batches, len(enc.texts)
        return response

    @staticmethod
    def _generated(times: RequestTimes, last: GenerationChunk, output_seconds: float) -> None:
        """Fills in a generation's times from its last chunk (the scheduler's own timings)."""
        times.output_seconds = output_seconds
        times.inferences = 1
        if last.timings is not None:
            times.queue_seconds = last.timings.queue_seconds
            times.compute_seconds = max(0.0, last.timings.total_seconds - last.timings.queue_seconds)


def request_shape(request: pb.ModelInferRequest, name: str) -> list[int]:
    """The shape of the request's input `name` (outputs mirror it)."""
    return next(list(i.shape) for i in request.inputs if i.name == name)
