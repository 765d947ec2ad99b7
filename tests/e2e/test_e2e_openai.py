"""The OpenAI-compatible HTTP API end to end: the real server (`--http-port 0`), driven by the official
`openai` SDK, curl (the raw server-sent events) and plain sockets (clients that disconnect mid-stream).

The quick demo repository for completions and embeddings (`docgpt` has no chat template), the tiny Llama and
Qwen2 checkpoints of `llm_repo` for chat; answers are compared with the nlpserve.v1 front's on the same
server. More servers for TLS with client certificates and API keys, and the flag's edge cases; the drain runs
serve() in-process, with one stream held on an event so that it is in flight when the stop comes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
from e2e_util import sample, scrape, start, wait_streams_ended
from prometheus_client import CollectorRegistry

from client.proto import inference_pb2 as pb
from client.proto import inference_pb2_grpc
from server import app
from server.config import load_settings
from server.models import ModelHub
from server.process import ROOT, ServerProcess

PROMPT = "def "
CONVERSATION = [{"role": "user", "content": "Hello, world! How are you today?"}]  # llm_util.EOS_CONVERSATION
KEY = "openai-test-key-0123456789"


def sdk(srv: ServerProcess, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{srv.http_url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw
    )


def post(srv: ServerProcess, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    """POSTs `body` (bytes as they are); returns the status and the decoded JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{srv.http_url}{path}", data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str, headers: dict | None = None, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def grpc_generate(stub, prompt: str = "", messages=(), *, model: str, **params) -> pb.GenerateResponse:
    request = pb.GenerateRequest(model=model, prompt=prompt, parameters=pb.GenerationParameters(**params))
    for m in messages:
        request.messages.add(role=m["role"], content=m["content"])
    return stub.Generate(request, timeout=60)


def error_of(exc: openai.APIStatusError) -> dict:
    return exc.body if "message" in exc.body else exc.body["error"]


# ---------------------------------------------------------------------------------------------------------
# Completions, embeddings, models: the quick repository (conftest's `srv` and `stub`, one server)


@pytest.fixture(scope="module")
def oai(srv: ServerProcess) -> Iterator[openai.OpenAI]:
    with sdk(srv) as client:
        yield client


def test_models_are_listed_and_retrieved(oai: openai.OpenAI, stub) -> None:
    hosted = {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    listed = oai.models.list()
    assert {m.id for m in listed.data} == hosted >= {"docgpt", "minilm-embed", "sentiment"}
    assert all(m.object == "model" and m.owned_by == "nlpserve" and m.created > 0 for m in listed.data)
    assert oai.models.retrieve("docgpt").id == "docgpt"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_a_greedy_completion_is_the_same_text_as_over_grpc(oai: openai.OpenAI, stub) -> None:
    reference = grpc_generate(stub, PROMPT, model="docgpt", max_new_tokens=24, temperature=0)
    answer = oai.completions.create(model="docgpt", prompt=PROMPT, max_tokens=24, temperature=0)
    assert answer.choices[0].text == reference.text
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.model == "docgpt"
    assert answer.created > 0 and answer.system_fingerprint.startswith("nlpserve-docgpt-v1-")
    expected = "length" if reference.finish_reason == pb.FINISH_REASON_LENGTH else "stop"
    assert answer.choices[0].finish_reason == expected and answer.choices[0].index == 0
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        reference.usage.prompt_tokens,
        reference.usage.generated_tokens,
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # A list of one prompt is the same request.
    again = oai.completions.create(model="docgpt", prompt=[PROMPT], max_tokens=24, temperature=0)
    assert again.choices[0].text == reference.text


def test_a_seeded_sampled_completion_is_the_same_as_over_grpc(oai: openai.OpenAI, stub) -> None:
    params = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    reference = grpc_generate(stub, PROMPT, model="docgpt", max_new_tokens=20, **params)
    texts = {
        oai.completions.create(model="docgpt", prompt=PROMPT, max_tokens=20, **params).choices[0].text
        for _ in range(2)
    }
    assert texts == {reference.text}


def test_a_streamed_completion_with_usage_equals_the_unary_one(oai: openai.OpenAI) -> None:
    unary = oai.completions.create(model="docgpt", prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(
        oai.completions.create(
            model="docgpt",
            prompt=PROMPT,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content) == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in content][-1] == unary.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1]) and all(
        c.usage is None for c in content
    )
    assert last.choices == [] and last.usage == unary.usage
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    # Without include_usage, no usage chunk.
    plain = list(
        oai.completions.create(model="docgpt", prompt=PROMPT, max_tokens=30, temperature=0, stream=True)
    )
    assert (
        all(c.choices for c in plain) and plain[-1].choices[0].finish_reason == unary.choices[0].finish_reason
    )


def test_logprobs_and_stop_sequences(oai: openai.OpenAI, stub) -> None:
    reference = grpc_generate(stub, PROMPT, model="docgpt", max_new_tokens=16, temperature=0, logprobs=True)
    answer = oai.completions.create(model="docgpt", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0)
    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(list(reference.logprobs))
    assert len(logprobs.tokens) == len(reference.token_ids) and logprobs.text_offset[0] == len(PROMPT)
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="docgpt", prompt=PROMPT, max_tokens=4, logprobs=2)
    assert info.value.param == "logprobs"
    # A stop sequence from the middle of a seeded answer ends the same answer before it (the quick model's
    # greedy answers are all spaces).
    seeded = {"model": "docgpt", "prompt": PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": 3}
    text = oai.completions.create(**seeded).choices[0].text
    stop = text[len(text) // 2 :][:2]
    assert stop
    stopped = oai.completions.create(**seeded, stop=[stop, "\x00"]).choices[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text and text.startswith(stopped.text)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"echo": True}, "echo"),
        ({"stop": [""]}, "stop[0]"),
        ({"seed": -1}, "seed"),
        ({"seed": 10**4000}, "seed"),  # JSON allows it; the message shows 20 of its digits
        ({"extra_body": {"logprobs": -(10**4000)}}, "logprobs"),
        ({"max_tokens": 10**4000}, "max_tokens"),  # every integer field is bounded, not only the seed
        ({"extra_body": {"top_k": 10**4000}}, "top_k"),
        ({"temperature": 10**400}, "temperature"),  # past float range: a 400, not a 500
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"extra_body": {"prompt": [1, 2, 3]}}, "prompt"),
        ({"model": "sentiment"}, "model"),
    ],
)
def test_bad_completion_requests_name_the_parameter(oai: openai.OpenAI, kwargs: dict, param: str) -> None:
    kwargs = {"model": "docgpt", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(**kwargs)
    assert info.value.status_code == 400 and info.value.param == param
    assert info.value.type == "invalid_request_error" and error_of(info.value)["message"].startswith(param)
    assert len(error_of(info.value)["message"]) < 200  # never an echo of unbounded input


def test_unknown_model_and_chat_without_a_template(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="no-such-model", prompt=PROMPT)
    assert info.value.code == "model_not_found" and "no-such-model" in error_of(info.value)["message"]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="docgpt", messages=CONVERSATION)
    assert info.value.param == "model" and "no chat template" in error_of(info.value)["message"]


def test_embeddings_float_base64_and_dimensions_match_grpc(oai: openai.OpenAI, stub) -> None:
    texts = ["A man is eating food.", "The stock market fell.", "Café déjà vu 🙂"]
    reference = stub.Embed(pb.EmbedRequest(model="minilm-embed", texts=texts), timeout=60)
    floats = oai.embeddings.create(model="minilm-embed", input=texts, encoding_format="float")
    assert floats.object == "list" and floats.model == "minilm-embed"
    assert [e.index for e in floats.data] == [0, 1, 2] and all(e.object == "embedding" for e in floats.data)
    vectors = np.array([e.embedding for e in floats.data])
    np.testing.assert_allclose(vectors, [list(e.values) for e in reference.embeddings], rtol=1e-6)
    assert (
        floats.usage.prompt_tokens
        == floats.usage.total_tokens
        == sum(e.num_tokens for e in reference.embeddings)
    )
    # base64: little-endian float32, the same values exactly (the SDK asks for it by default and decodes it).
    raw = oai.embeddings.create(model="minilm-embed", input=texts, encoding_format="base64")
    decoded = [struct.unpack(f"<{vectors.shape[1]}f", base64.b64decode(e.embedding)) for e in raw.data]
    np.testing.assert_array_equal(np.float32(decoded), np.float32(vectors))
    default = oai.embeddings.create(model="minilm-embed", input=texts)
    np.testing.assert_array_equal(np.float32([e.embedding for e in default.data]), np.float32(vectors))
    # dimensions: shortened and normalized again, as over gRPC; one string is one input.
    short = oai.embeddings.create(model="minilm-embed", input=texts[0], dimensions=8, encoding_format="float")
    shortened = stub.Embed(pb.EmbedRequest(model="minilm-embed", texts=texts[:1], dimensions=8), timeout=60)
    np.testing.assert_allclose(short.data[0].embedding, shortened.embeddings[0].values, rtol=1e-6)
    assert len(short.data) == 1 and np.linalg.norm(short.data[0].embedding) == pytest.approx(1, abs=1e-5)


def test_a_classifier_embeds_with_its_embedding_output(oai: openai.OpenAI, stub) -> None:
    reference = stub.Classify(
        pb.ClassifyRequest(model="sentiment", texts=["a fine film"], return_embedding=True)
    )
    answer = oai.embeddings.create(model="sentiment", input="a fine film", encoding_format="float")
    np.testing.assert_allclose(answer.data[0].embedding, reference.results[0].embedding, rtol=1e-6)
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model="sentiment", input="a fine film", dimensions=4)
    assert info.value.param == "dimensions"
    for kwargs, param in (
        ({"model": "docgpt"}, "model"),
        ({"encoding_format": "int8"}, "encoding_format"),
        ({"input": [""]}, "input[0]"),
        ({"input": []}, "input"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            oai.embeddings.create(**{"model": "minilm-embed", "input": "x", **kwargs})
        assert info.value.param == param


def test_raw_server_sent_events_with_curl(srv: ServerProcess) -> None:
    body = {
        "model": "docgpt",
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "-D",
            "-",
            f"{srv.http_url}/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    head, _, stream = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-type: text/event-stream" in head.lower()
    assert stream.endswith(b"data: [DONE]\n\n")
    events = stream.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    *chunks, usage, done = (e.removeprefix(b"data: ") for e in events)
    assert done == b"[DONE]"
    chunks = [json.loads(c) for c in chunks]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert json.loads(usage)["choices"] == [] and json.loads(usage)["usage"]["completion_tokens"] <= 12
    # An error before the first token is an HTTP status with OpenAI's error object, not a stream.
    bad = subprocess.run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            f"{srv.http_url}/v1/completions",
            "-d",
            json.dumps({**body, "temperature": -1}),
        ],
        capture_output=True,
        timeout=60,
        check=True,
        text=True,
    )
    answer, code = bad.stdout.rsplit("\n", 1)
    assert code == "400" and json.loads(answer)["error"]["param"] == "temperature"


def test_malformed_and_oversized_bodies(srv: ServerProcess) -> None:
    for body, fragment in (
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"prompt": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ):
        status, answer = post(srv, "/v1/completions", body)
        assert status == 400 and fragment in answer["error"]["message"], (body[:20], answer)
        assert len(answer["error"]["message"]) < 200  # never an echo of the input
    huge = {"model": "docgpt", "prompt": "x" * (4 * 1024 * 1024)}  # over the default --max-message-bytes
    status, answer = post(srv, "/v1/completions", huge)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    status, answer = post(srv, "/v1/completions", {"model": "docgpt", "prompt": "x" * 100_000})
    assert status == 400 and answer["error"]["param"] == "prompt" and len(answer["error"]["message"]) < 200
    status, raw = get(f"{srv.http_url}/v1/nothing-here")
    assert status == 404 and "error" in json.loads(raw)
    assert get(f"{srv.http_url}/health") == (200, b'{"status":"SERVING"}')


def test_requests_are_counted_in_the_servers_metrics(srv: ServerProcess, oai: openai.OpenAI) -> None:
    before = scrape(srv)
    oai.completions.create(model="docgpt", prompt=PROMPT, max_tokens=2)
    list(oai.completions.create(model="docgpt", prompt=PROMPT, max_tokens=2, stream=True))
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="docgpt", prompt=PROMPT, n=3)
    after = scrape(srv)

    def grew(method: str, code: str) -> float:
        labels = {"model": "docgpt", "method": method, "code": code}
        return sample(after, "nlpserve_requests_total", **labels) - sample(
            before, "nlpserve_requests_total", **labels
        )

    assert grew("OpenAI.Completions", "OK") == 1 and grew("OpenAI.CompletionsStream", "OK") == 1
    assert grew("OpenAI.Completions", "INVALID_ARGUMENT") == 1
    # The HTTP port serves the same registry at /metrics.
    status, text = get(f"{srv.http_url}/metrics")
    assert status == 200 and b'method="OpenAI.CompletionsStream"' in text


def open_stream(port: int, body: dict) -> socket.socket:
    """A raw HTTP/1.1 request for a stream, read up to its first event (so its sequence is generating)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = b""
    while b"data: " not in received:
        data = sock.recv(4096)
        assert data, received
        received += data
    assert received.startswith(b"HTTP/1.1 200"), received
    return sock


def test_a_client_that_disconnects_frees_its_slot(srv: ServerProcess, stub) -> None:
    limit = stub.GetModel(pb.GetModelRequest(name="docgpt"), timeout=30).limits.max_sequence_length
    max_new = limit - 8
    labels = {"model": "docgpt"}
    body = {"model": "docgpt", "prompt": "hello", "max_tokens": max_new, "temperature": 0.8, "stream": True}

    # As tests/e2e/test_e2e_generate.py's gRPC cancel: three streams closed after their first event; the quick
    # model may finish one before its disconnect reaches the server (OK). Rounds repeat until three were
    # cancelled mid-stream and a round generated fewer tokens than asked (the bound stops a server that never
    # cancels); each round waits until the server counted every stream and holds no active sequence.
    cancelled, left_early = 0, False
    for _ in range(20):
        before = scrape(srv)
        for sock in [open_stream(srv.http_port, body) for _ in range(3)]:
            sock.close()
        counted, after = wait_streams_ended(srv, before, "OpenAI.CompletionsStream", 3)
        cancelled += counted["CANCELLED"]
        generated = sample(after, "nlpserve_generated_tokens_total", **labels) - sample(
            before, "nlpserve_generated_tokens_total", **labels
        )
        left_early |= counted["CANCELLED"] > 0 and generated < 3 * max_new
        if cancelled >= 3 and left_early:
            break
    assert cancelled >= 3 and left_early, (cancelled, left_early)
    assert grpc_generate(stub, "hello", model="docgpt", max_new_tokens=2).usage.generated_tokens >= 1


# ---------------------------------------------------------------------------------------------------------
# Chat: the tiny Llama and Qwen2 checkpoints


@pytest.fixture(scope="module")
def llm_srv(llm_repo: Path) -> Iterator[ServerProcess]:
    with start(llm_repo) as running:
        yield running


@pytest.fixture(scope="module")
def llm_stub(llm_srv: ServerProcess) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(llm_srv.target) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def chat(llm_srv: ServerProcess) -> Iterator[openai.OpenAI]:
    with sdk(llm_srv) as client:
        yield client


@pytest.mark.parametrize("model", ["tinyllama", "tinyqwen"])
def test_a_greedy_chat_is_the_same_answer_as_over_grpc(chat: openai.OpenAI, llm_stub, model: str) -> None:
    reference = grpc_generate(llm_stub, messages=CONVERSATION, model=model, max_new_tokens=20, temperature=0)
    answer = chat.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=20, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == reference.text
    assert reference.finish_reason == pb.FINISH_REASON_EOS and choice.finish_reason == "stop"
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.usage.prompt_tokens == reference.usage.prompt_tokens
    assert answer.usage.completion_tokens == reference.usage.generated_tokens
    # Content as a list of text parts is the same; OpenAI's "developer" role is the template's "system".
    parts = [{"role": "user", "content": [{"type": "text", "text": CONVERSATION[0]["content"]}]}]
    again = chat.chat.completions.create(model=model, messages=parts, max_tokens=20, temperature=0)
    assert again.choices[0].message.content == reference.text
    system = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    briefed = grpc_generate(llm_stub, messages=system, model=model, max_new_tokens=20, temperature=0)
    developer = [{"role": "developer", "content": "Be brief."}, *CONVERSATION]
    answer = chat.chat.completions.create(model=model, messages=developer, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == briefed.text


def test_a_streamed_chat_with_usage_equals_the_unary_one(chat: openai.OpenAI) -> None:
    kwargs = {"model": "tinyllama", "messages": CONVERSATION, "max_completion_tokens": 20, "temperature": 0}
    unary = chat.chat.completions.create(**kwargs)
    chunks = list(chat.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    *content, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == unary.choices[0].message.content
    assert content[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert usage.choices == [] and usage.usage == unary.usage
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1


def test_chat_logprobs_and_limits(chat: openai.OpenAI, llm_stub) -> None:
    reference = grpc_generate(
        llm_stub, messages=CONVERSATION, model="tinyllama", max_new_tokens=2, temperature=0, logprobs=True
    )
    answer = chat.chat.completions.create(
        model="tinyllama",
        messages=CONVERSATION,
        max_completion_tokens=2,
        temperature=0,
        logprobs=True,
        top_logprobs=0,
    )
    content = answer.choices[0].logprobs.content
    assert [t.logprob for t in content] == pytest.approx(list(reference.logprobs))
    assert all(t.top_logprobs == [] for t in content)
    # Its answer ends (EOS) at its 3rd token: 2 end by length.
    assert answer.usage.completion_tokens == 2 and answer.choices[0].finish_reason == "length"
    for kwargs, param in (
        ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            chat.chat.completions.create(**{"model": "tinyllama", "messages": CONVERSATION, **kwargs})
        assert info.value.param == param, kwargs


# ---------------------------------------------------------------------------------------------------------
# HTTPS with client certificates, and API keys


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now, day = dt.datetime.now(dt.UTC), dt.timedelta(days=1)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def certificate(subject: str, key, issuer_key, usage=None, san=None, ca=False):
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name("openai test CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day)
            .not_valid_after(now + day)
        )
        if ca:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {
        "ca": certificate("openai test CA", ca_key, ca_key, ca=True),
        "server": certificate(
            "nlpserve",
            server_key,
            ca_key,
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ),
        "server-key": pem(server_key),
        "client": certificate("a client", client_key, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH),
        "client-key": pem(client_key),
    }
    for stem, data in files.items():
        (folder / f"{stem}.pem").write_bytes(data)
    return {stem: folder / f"{stem}.pem" for stem in files}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _certificates(tmp_path_factory.mktemp("openai-pki"))


@pytest.fixture(scope="module")
def secure_srv(models: Path, pki: dict[str, Path]) -> Iterator[ServerProcess]:
    args = [
        "--tls-cert",
        str(pki["server"]),
        "--tls-key",
        str(pki["server-key"]),
        "--tls-client-ca",
        str(pki["ca"]),
    ]
    with ServerProcess(
        models, args=["--log-level", "DEBUG", *args], env={"NLPSERVE_API_KEYS": KEY}
    ) as running:
        yield running


def test_https_with_client_certificates_and_api_keys(secure_srv: ServerProcess, pki: dict[str, Path]) -> None:
    base = f"https://127.0.0.1:{secure_srv.http_port}"
    assert secure_srv.http_url == base
    context = ssl.create_default_context(cafile=pki["ca"])
    context.load_cert_chain(pki["client"], pki["client-key"])
    bearer = {"Authorization": f"Bearer {KEY}"}
    # /health needs no key; everything else does, known path or not, /metrics included.
    assert get(f"{base}/health", context=context)[0] == 200
    for path in ("/v1/models", "/v1/nothing-here", "/metrics"):
        status, raw = get(f"{base}{path}", context=context)
        assert status == 401, path
        assert json.loads(raw)["error"] == {
            "message": "missing or invalid API key",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    assert get(f"{base}/v1/models", {"Authorization": "Bearer wrong"}, context)[0] == 401
    assert get(f"{base}/v1/models", bearer, context)[0] == 200
    status, text = get(f"{base}/metrics", bearer, context)
    assert status == 200 and b'code="UNAUTHENTICATED",method="OpenAI.ListModels"' in text
    # The SDK with its key, over HTTPS with its client certificate.
    with sdk(secure_srv, api_key=KEY, http_client=openai.DefaultHttpxClient(verify=context)) as client:
        assert (
            client.completions.create(model="docgpt", prompt=PROMPT, max_tokens=2).usage.completion_tokens
            >= 1
        )
    wrong = sdk(secure_srv, api_key="wrong", http_client=openai.DefaultHttpxClient(verify=context))
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    # Without a client certificate the handshake fails.
    bare = ssl.create_default_context(cafile=pki["ca"])
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(f"{base}/health", context=bare)


# ---------------------------------------------------------------------------------------------------------
# The drain, the flag


def test_the_drain_refuses_new_requests_and_finishes_a_stream_in_flight(
    models: Path, monkeypatch, caplog
) -> None:
    """serve() in-process, its event loop in a thread; a stream is held after its first chunk (on an event,
    not a sleep), so that it is in flight, deterministically, when the stop comes."""
    release = threading.Event()
    real_stream = ModelHub.generate_stream

    def held_stream(self, served, request, deadline):
        async def chunks():
            inner = real_stream(self, served, request, deadline)
            first = True
            async with contextlib.aclosing(inner):
                async for chunk in inner:
                    yield chunk
                    if first:
                        first = False
                        await asyncio.to_thread(release.wait, 60)

        return chunks()

    monkeypatch.setattr(ModelHub, "generate_stream", held_stream)
    settings = load_settings(["--models", str(models), "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                              "-1", "--http-port", "0", "--grace-seconds", "60"], {})  # fmt: skip
    ports: list[int] = []
    ready, state = threading.Event(), {}

    def main() -> None:
        async def go() -> int:
            state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
            return await app.serve(
                settings,
                CollectorRegistry(),
                state["stop"],
                on_ready=lambda *p: (ports.extend(p), ready.set()),
            )

        state["exit"] = asyncio.run(go())

    thread = threading.Thread(target=main)
    caplog.set_level(logging.INFO, logger="server.app")
    thread.start()
    try:
        assert ready.wait(120)
        base = f"http://127.0.0.1:{ports[2]}"
        stream = open_stream(
            ports[2], {"model": "docgpt", "prompt": PROMPT, "max_tokens": 40, "stream": True}
        )
        state["loop"].call_soon_threadsafe(state["stop"].set)
        # /health turns 503 at once; new requests get 503 once the drain starts, the stream still held.
        deadline = time.monotonic() + 60
        while get(f"{base}/health")[0] != 503:
            assert time.monotonic() < deadline
        while True:
            status, raw = get(f"{base}/v1/models")
            if status == 503:
                break
            assert status == 200 and time.monotonic() < deadline
        error = json.loads(raw)["error"]
        assert error["type"] == "service_unavailable_error" and "shutting down" in error["message"]
        # Released, the stream finishes, whole, within the grace period; then serve() returns 0.
        release.set()
        received = b""
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
            data = stream.recv(65536)
            assert data, received[-300:]
            received += data
        stream.close()
        assert b"data: [DONE]\n\n" in received and b'"finish_reason":"' in received
    finally:
        release.set()
        if "loop" in state and thread.is_alive():
            state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(60)
    assert state["exit"] == 0
    assert any("1 in flight" in r.getMessage() for r in caplog.records if r.name == "server.app")


def test_the_http_port_flag(models: Path) -> None:
    assert load_settings(["--models", "m"], {}).http_port == 8080
    assert load_settings(["--models", "m"], {"NLPSERVE_HTTP_PORT": "9001"}).http_port == 9001
    assert load_settings(["--models", "m", "--http-port", "-1"], {}).http_port == -1
    with pytest.raises(SystemExit):
        load_settings(["--models", "m", "--http-port", "-2"], {})
    # -1 turns it off; a busy port is a one-line start-up error.
    with start(models, "--http-port", "-1") as srv:
        assert srv.http_port == -1
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "server",
                "--models",
                str(models),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--http-port",
                str(port),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot start: --http-port {port}: cannot listen on 127.0.0.1:{port}" in result.stderr
