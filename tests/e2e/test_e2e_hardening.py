"""Hostile and broken input from outside, and a model that computes NaN: each gets a clean status, counted,
and the server serves the other clients on. Two servers: one over the quick models with a poisoned generator,
one stopped with SIGTERM under load."""

from __future__ import annotations

import collections
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from e2e_util import sample, scrape, start
from onnx import numpy_helper

from client.proto import inference_pb2 as pb
from client.proto import inference_pb2_grpc
from server.process import ServerProcess

SERVICE = "/nlpserve.v1.InferenceService/"
POISONED_POSITION = 100  # docgpt (context 128) computes NaN from this position on
UNREAD_SECONDS = 1
BIG = 3_900_000  # characters: just under the 4 MB message limit
# A client receive window of 256 bytes that never grows: the server's writes block soon, as they do after 64 KB
# for a client that stopped reading. Soon enough for a held stream (held_stream(): 90 tokens and their
# log-probabilities, about 700 bytes even when the server joins them all into one message, as it does when its
# event loop falls behind on a loaded machine; without log-probabilities, 90 tokens joined are about 320 bytes,
# which a 1 KB window let through: the stream then ended OK, unread, and nothing was held).
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 256), ("grpc.http2.bdp_probe", 0)]


def poison(repo: Path, out: Path) -> Path:
    """A copy of the quick repository whose generator's position embedding is NaN at POISONED_POSITION: every
    sequence that reaches that position gets NaN logits; shorter ones are untouched (rows do not mix)."""
    shutil.copytree(repo, out)
    folder = out / "docgpt" / "1"
    for variant in folder.glob("model.*.onnx"):
        variant.unlink()  # fp32 only: the variants would keep the clean weights
    model = onnx.load(folder / "model.onnx")
    (wpe,) = [i for i in model.graph.initializer if i.name.endswith("wpe.weight")]
    weights = numpy_helper.to_array(wpe).copy()
    weights[POISONED_POSITION:] = np.nan
    wpe.CopyFrom(numpy_helper.from_array(weights, wpe.name))
    onnx.save(model, folder / "model.onnx")
    return out


@pytest.fixture(scope="module")
def hostile_srv(quick_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = poison(quick_repo, tmp_path_factory.mktemp("poisoned") / "models")
    with start(repo, "--unread-stream-seconds", str(UNREAD_SECONDS)) as running:
        yield running


@pytest.fixture(scope="module")
def ch(hostile_srv: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(hostile_srv.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def api(ch: grpc.Channel) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(ch)


def generate(prompt: str, max_new_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="docgpt", prompt=prompt, parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens)
    )


def held_stream() -> pb.GenerateRequest:
    """A stream longer than SMALL_WINDOW however it is cut into messages: it cannot end before it is read."""
    request = generate("hello", 90)
    request.parameters.logprobs = True
    return request


def test_a_message_that_does_not_parse_is_invalid_argument_counted_and_logged_without_traceback(
    hostile_srv, ch
):
    before = sample(scrape(hostile_srv), "nlpserve_requests_total", model="", method="Classify",
                    code="INVALID_ARGUMENT")
    raw = ch.unary_unary(SERVICE + "Classify")  # no serializers: the request is these bytes
    bad_utf8 = b"\x12\x03\xff\xfe\xfd"  # texts (field 2) = three bytes that are not UTF-8
    for garbage in (bad_utf8, b"\x12\x10truncated", b"\xff\xff\xff\xff"):
        with pytest.raises(grpc.RpcError) as info:
            raw(garbage, timeout=30)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, garbage
        assert info.value.details().startswith("request: not a valid ClassifyRequest")
    after = sample(scrape(hostile_srv), "nlpserve_requests_total", model="", method="Classify",
                   code="INVALID_ARGUMENT")
    assert after - before == 3
    assert "DecodeError" not in hostile_srv.logs() and "Traceback" not in hostile_srv.logs()


@pytest.mark.parametrize("method", ["Classify", "Generate", "GenerateStream", "ListModels", "GetModel"])
def test_a_call_half_closed_without_a_message_is_answered(ch, method):
    # The wire does not tell a unary call from a client-streaming one: this sends the headers, then
    # end-of-stream, and no message. Before, the server never answered and the client waited for its deadline.
    if method == "GenerateStream":
        call = ch.stream_stream(SERVICE + method)(iter([]), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    else:
        with pytest.raises(grpc.RpcError) as info:
            ch.stream_unary(SERVICE + method)(iter([]), timeout=60)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request: no request message")


def test_a_text_of_megabytes_is_cut_before_tokenizing(api):
    text = "a good film " * (BIG // 12)
    reply = api.Classify(pb.ClassifyRequest(model="sentiment", texts=[text, "fine"]), timeout=60)
    first, second = reply.results
    assert first.truncated and first.num_tokens == 64  # the model's max_sequence_length
    assert not second.truncated
    with pytest.raises(grpc.RpcError) as info:
        api.Classify(pb.ClassifyRequest(model="sentiment", texts=["fine", text], no_truncation=True), timeout=60)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"texts[1]: {len(text)} characters, more than the {64 * 128} this model")


def test_a_prompt_of_megabytes_is_refused_before_tokenizing(api):
    for request in (
        generate("hello " * (BIG // 6), 4),
        pb.GenerateRequest(model="docgpt", messages=[pb.ChatMessage(role="user", content="x" * BIG)]),
    ):
        with pytest.raises(grpc.RpcError) as info:
            api.Generate(request, timeout=60)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details()
        assert "cannot fit the model's context of 128 tokens" in details or "no chat template" in details
        assert len(details) < 200


def test_nan_logits_fail_that_sequence_alone(hostile_srv, api):
    prompt = "hello there"
    poisoned = api.GenerateStream(generate(prompt, POISONED_POSITION + 10), timeout=120)
    healthy = [api.Generate.future(generate(prompt, 20), timeout=120) for _ in range(3)]
    with pytest.raises(grpc.RpcError) as info:
        for _ in poisoned:
            pass
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert info.value.details() == "the model computed non-finite logits (NaN or inf)"
    for future in healthy:
        assert future.result().usage.generated_tokens == 20  # below the poisoned position: untouched
    # ...and the model serves on.
    assert api.Generate(generate(prompt, 5), timeout=60).usage.generated_tokens == 5
    assert "non-finite logits" in hostile_srv.logs()


def test_durations_are_observed_for_every_status_and_prefills_have_a_histogram(hostile_srv, api):
    with pytest.raises(grpc.RpcError):
        api.GetModel(pb.GetModelRequest(name="nope"), timeout=30)
    api.Generate(generate("hello", 3), timeout=60)
    samples = scrape(hostile_srv)
    assert sample(samples, "nlpserve_request_duration_seconds_count", model="", method="GetModel",
                  code="NOT_FOUND") >= 1
    assert sample(samples, "nlpserve_prefill_duration_seconds_count", model="docgpt") >= 1


def test_a_stream_nobody_reads_ends_after_the_unread_timeout(hostile_srv):
    # A tiny receive window (SMALL_WINDOW, no BDP probing to grow it): the server's writes block after 256
    # bytes, as they would after 64 KB for a client that stopped reading.
    code = {"model": "docgpt", "method": "GenerateStream", "code": "RESOURCE_EXHAUSTED"}
    before = sample(scrape(hostile_srv), "nlpserve_requests_total", **code)
    with grpc.insecure_channel(hostile_srv.target, options=SMALL_WINDOW) as channel:
        api = inference_pb2_grpc.InferenceServiceStub(channel)
        streams = [
            api.GenerateStream(held_stream(), timeout=120) for _ in range(3)
        ]  # nobody reads them (yet)
        deadline = time.monotonic() + 90
        while sample(scrape(hostile_srv), "nlpserve_requests_total", **code) - before < 3:
            assert time.monotonic() < deadline, "the unread streams never ended"
            time.sleep(0.2)
        for stream in streams:  # reading now gets what was sent, then the status
            with pytest.raises(grpc.RpcError) as info:
                for _ in stream:
                    pass
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details() == f"the client read nothing for {UNREAD_SECONDS}s"


def test_unread_streams_do_not_hold_a_graceful_stop(quick_repo):
    # A grace period far longer than the test waits: the stop must not need it.
    with start(quick_repo, "--unread-stream-seconds", str(UNREAD_SECONDS), "--grace-seconds", "600") as srv:
        with grpc.insecure_channel(srv.target, options=SMALL_WINDOW) as channel:
            api = inference_pb2_grpc.InferenceServiceStub(channel)
            streams = [api.GenerateStream(held_stream(), timeout=300) for _ in range(4)]
            deadline = time.monotonic() + 120
            # Every stream prefilled (so admitted, and in flight when the signal comes).
            while sample(scrape(srv), "nlpserve_queue_duration_seconds_count", model="docgpt",
                         method="Generate") < 4:
                assert time.monotonic() < deadline, "the streams never started"
                time.sleep(0.05)
            srv.send_signal(signal.SIGTERM)
            assert srv.wait(timeout=300) == 0
            del streams
        # Each stream ended by the unread timeout (during the drain, or just before it on a slow machine), and
        # the stop did not wait for the grace period.
        assert srv.logs().count(f"the client read nothing for {UNREAD_SECONDS}s; the stream ends") == 4
        assert "grace period over" not in srv.logs()


def test_calls_during_a_drain_get_unavailable_not_cancelled(quick_repo):
    with start(quick_repo, "--grace-seconds", "600", "--unread-stream-seconds", "600") as srv:
        # A stream this test reads only once it has seen the drain refuse calls: it holds the drain open.
        held_channel = grpc.insecure_channel(srv.target, options=SMALL_WINDOW)
        held = inference_pb2_grpc.InferenceServiceStub(held_channel).GenerateStream(
            held_stream(), timeout=300
        )
        codes: collections.Counter[tuple[grpc.StatusCode, str]] = collections.Counter()
        refused = threading.Event()
        stop = threading.Event()
        clients = 4

        def hammer() -> None:  # new calls all through the stop, each client one at a time
            with grpc.insecure_channel(srv.target) as channel:
                api = inference_pb2_grpc.InferenceServiceStub(channel)
                while not stop.is_set():
                    try:
                        api.Classify(pb.ClassifyRequest(model="sentiment", texts=["fine"]), timeout=30)
                        codes[grpc.StatusCode.OK, ""] += 1
                    except grpc.RpcError as exc:
                        codes[exc.code(), exc.details()] += 1
                        if exc.details() == "the server is shutting down":
                            refused.set()

        with ThreadPoolExecutor(clients) as pool:
            workers = [pool.submit(hammer) for _ in range(clients)]
            while not codes:
                time.sleep(0.05)
            srv.send_signal(signal.SIGTERM)
            assert refused.wait(timeout=120), codes
            assert sum(1 for _ in held) >= 1  # read now: the held stream finishes OK, and the drain can end
            assert srv.wait(timeout=300) == 0
            stop.set()
            for worker in workers:
                worker.result()
        held_channel.close()
        # Only a call that reached gRPC in the very instant its listener closed can be CANCELLED (gRPC's core
        # cancels the calls it accepted but had not handed to the server yet): at most one per client.
        cancelled = sum(n for (code, _), n in codes.items() if code is grpc.StatusCode.CANCELLED)
        assert cancelled <= clients, codes
        expected = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        assert {code for code, _ in codes} <= expected, codes
