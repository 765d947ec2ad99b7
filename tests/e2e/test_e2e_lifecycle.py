"""The server process: health, metric names, graceful drain under load, start-up failures, overload."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from e2e_util import sample, scrape, start
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client.proto import inference_pb2 as pb
from client.proto import inference_pb2_grpc
from server.process import ServerProcess
from server.servicers.oip import grpc_service_pb2 as oip
from server.servicers.oip import grpc_service_pb2_grpc as oip_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ["", "nlpserve.v1.InferenceService", "sentiment", "docgpt"]
# A client's receive window of 256 bytes per stream, not grown by BDP probing: a stream the client does not read
# stops once that much is sent (as it would after 64 KiB for a client that stopped reading).
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 256), ("grpc.http2.bdp_probe", 0)]


def health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def gen_request(max_new_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="hello", parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens)
    )


def test_health_of_the_server_and_of_each_model(channel):
    for service in SERVICES:
        assert health(channel, service) == SERVING, service
    with pytest.raises(grpc.RpcError) as exc:
        health(channel, "no-such-model")
    assert exc.value.code() is grpc.StatusCode.NOT_FOUND


def test_metric_names_types_and_labels(srv, stub):
    stub.Classify(pb.ClassifyRequest(texts=["good", "bad"]), timeout=30)
    list(stub.GenerateStream(gen_request(5), timeout=30))
    stub.Generate(gen_request(5), timeout=30)
    stub.ListModels(pb.ListModelsRequest(), timeout=30)
    import urllib.request

    with urllib.request.urlopen(srv.metrics_url, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    expected = {
        "nlpserve_requests": ("counter", {"model", "method", "code"}),
        "nlpserve_request_duration_seconds": ("histogram", {"model", "method", "code"}),
        "nlpserve_queue_duration_seconds": ("histogram", {"model", "method"}),
        "nlpserve_compute_duration_seconds": ("histogram", {"model", "method"}),
        "nlpserve_batch_size": ("histogram", {"model", "method"}),
        "nlpserve_prefill_duration_seconds": ("histogram", {"model"}),
        "nlpserve_queue_depth": ("gauge", {"model"}),
        "nlpserve_active_sequences": ("gauge", {"model"}),
        "nlpserve_prompt_tokens": ("counter", {"model"}),
        "nlpserve_generated_tokens": ("counter", {"model"}),
        "nlpserve_time_to_first_token_seconds": ("histogram", {"model"}),
        "nlpserve_inter_token_latency_seconds": ("histogram", {"model"}),
        "nlpserve_model_info": ("gauge", {"model", "version", "kind", "provider", "variant"}),
    }
    for name, (kind, labels) in expected.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].samples, name
        for s in families[name].samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    counters = {s.name for f in families.values() if f.type == "counter" for s in f.samples}
    assert {
        "nlpserve_requests_total",
        "nlpserve_prompt_tokens_total",
        "nlpserve_generated_tokens_total",
    } <= counters
    methods = {s.labels["method"] for s in families["nlpserve_requests"].samples}
    assert {"Classify", "Generate", "GenerateStream", "ListModels"} <= methods
    batch_methods = {s.labels["method"] for s in families["nlpserve_batch_size"].samples}
    assert batch_methods == {"Classify", "Embed", "Generate"}
    info = {s.labels["model"]: s.labels for s in families["nlpserve_model_info"].samples}
    assert info["docgpt"]["provider"] == "CPUExecutionProvider" and info["sentiment"]["kind"] == "classifier"


def test_overload_gets_resource_exhausted_and_the_rest_are_served(models):
    args = ("--max-active-sequences", "1", "--max-queue-size", "1", "--max-batch-size", "1")
    with start(models, *args) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def generate(_: int) -> grpc.StatusCode:
            try:
                list(stub.GenerateStream(gen_request(100), timeout=60))
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        def classify(_: int) -> grpc.StatusCode:
            try:
                stub.Classify(pb.ClassifyRequest(texts=["word " * 200] * 64), timeout=60)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        # A refusal needs requests that overlap, and how many of a burst do depends on the machine's load: the
        # bursts repeat until one of each kind was refused (the bound only stops a server that never refuses).
        # The first request of a burst always finds the queue empty, so every burst has an OK.
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        gen_codes: list[grpc.StatusCode] = []
        cls_codes: list[grpc.StatusCode] = []
        with ThreadPoolExecutor(16) as pool:
            for _ in range(20):
                if exhausted not in gen_codes:
                    gen_codes += pool.map(generate, range(16))
                if exhausted not in cls_codes:
                    cls_codes += pool.map(classify, range(32))
                if exhausted in gen_codes and exhausted in cls_codes:
                    break
        for codes in (gen_codes, cls_codes):
            assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        samples = scrape(srv)
        refused = sample(
            samples,
            "nlpserve_requests_total",
            model="docgpt",
            method="GenerateStream",
            code="RESOURCE_EXHAUSTED",
        )
        assert refused == gen_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert stub.Generate(gen_request(2), timeout=30).usage.generated_tokens >= 1  # serving again


def test_graceful_drain_under_load(models):
    # Every stream is admitted at once (64 slots). The streams come over a channel with a tiny receive window
    # (and no BDP probing to grow it), and are read only once the drain has begun: the server cannot send a
    # stream's last messages (120 tokens with their log-probabilities: more bytes than the window, however
    # they are joined) before its client reads, so the streams are still in flight when SIGTERM arrives,
    # however fast the machine generates.
    with (
        start(models, "--max-active-sequences", "64", "--grace-seconds", "60") as srv,
        grpc.insecure_channel(srv.target) as channel,
        grpc.insecure_channel(srv.target, options=SMALL_WINDOW) as streams_channel,
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        streams = inference_pb2_grpc.InferenceServiceStub(streams_channel)
        n = 32
        first_seen = threading.Barrier(n + 1, timeout=60)
        draining = threading.Event()
        results: list[object] = [None] * n

        def consume(i: int) -> None:
            try:
                request = gen_request(120)
                request.parameters.logprobs = True
                call = streams.GenerateStream(request, timeout=120)
                messages = [next(call)]
                first_seen.wait()
                assert draining.wait(60)
                messages.extend(call)
                results[i] = messages
            except (grpc.RpcError, threading.BrokenBarrierError) as exc:
                results[i] = exc

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        try:
            first_seen.wait()  # all streams are generating
            srv.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while health(channel, "") != NOT_SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                time.sleep(0.005)
            assert all(health(channel, s) == NOT_SERVING for s in SERVICES)
            with pytest.raises(grpc.RpcError) as exc:
                stub.Generate(gen_request(5), timeout=10)
            assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            draining.set()  # the streams may finish now
            for t in threads:
                t.join(120)
        # Every stream that was in flight finished normally.
        for r in results:
            assert isinstance(r, list), r
            assert r[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
        assert srv.wait(60) == 0
        drained = re.search(r"draining: .*?, (\d+) in flight", srv.logs())
        assert drained and int(drained.group(1)) > 0, srv.logs()  # the drain did wait for work in flight


def test_drain_delay_keeps_serving_while_not_serving(models):
    # With --drain-delay-seconds, health turns NOT_SERVING at SIGTERM (load balancers stop routing here) while
    # calls still succeed; only after the delay are new calls refused. Judged by this test's own clock, not by
    # how quickly it gets to call: the server cannot end the delay earlier than the delay after this test sent
    # the signal, so a call answered before then must have succeeded, and one refused before then is a
    # failure. On a machine so loaded that no call was answered by then, it runs again with a longer delay.
    for delay in (3.0, 12.0, 48.0):
        if _served_during_the_drain_delay(models, delay):
            return
    pytest.fail("no call was answered within the drain delay, not even within 48 s")


def _served_during_the_drain_delay(models: Path, delay: float) -> int:
    """How many calls were answered between NOT_SERVING and the earliest end of the delay (all of them OK),
    after checking that calls are refused after it and that the server then exits 0."""
    with (
        start(models, "--drain-delay-seconds", str(delay)) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        earliest_end = time.monotonic() + delay
        srv.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while health(channel, "") != NOT_SERVING:
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.005)
        # The Open Inference Protocol's readiness says no at once too (the call itself is still answered).
        kserve = oip_grpc.GRPCInferenceServiceStub(channel)
        if time.monotonic() < earliest_end:
            assert not kserve.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
            assert not kserve.ModelReady(oip.ModelReadyRequest(name="sentiment"), timeout=10).ready
        served = 0
        deadline = time.monotonic() + delay + 30
        while True:
            try:
                assert stub.Classify(pb.ClassifyRequest(texts=["still here"]), timeout=10).results
            except grpc.RpcError as exc:
                # UNAVAILABLE from the drain, or CANCELLED from gRPC's C core for a call that reached the listener
                # in the instant it closed (docs/server.md); either way only after the delay could have ended.
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                early = earliest_end - time.monotonic()
                assert early <= 0, f"refused {early:.2f}s before the drain delay could have ended"
                break
            served += time.monotonic() < earliest_end
            assert time.monotonic() < deadline, "calls were never refused after the drain delay"
            time.sleep(0.05)
        assert srv.wait(60) == 0
        assert f"still serving for {delay:.1f}s" in srv.logs()
        return served


def test_device_cuda_fails_clearly_when_cuda_is_not_active(models):
    srv = ServerProcess(models, args=["--device", "cuda"])
    try:
        srv.start()
    except RuntimeError as exc:
        message = str(exc)
        assert "exited with 1" in message
        assert "--device cuda" in message and "CUDAExecutionProvider" in message
    else:  # a machine with a working GPU: then CUDA must really be in use
        try:
            with grpc.insecure_channel(srv.target) as channel:
                info = inference_pb2_grpc.InferenceServiceStub(channel).ListModels(
                    pb.ListModelsRequest(), timeout=10
                )
            assert {m.execution_provider for m in info.models} == {"CUDAExecutionProvider"}
        finally:
            srv.stop()


def test_bad_repository_fails_at_start(tmp_path: Path):
    with pytest.raises(RuntimeError) as exc:
        ServerProcess(tmp_path).start()
    assert "no model found" in str(exc.value)


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_variant_in_use_is_reported(models, variant):
    # A model without the asked variant falls back to fp32, and says so.
    with start(models, "--variant", variant) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        samples = scrape(srv)
        for m in listed:
            config = json.loads((models / m.name / m.version / "config.json").read_text())
            expected = variant if variant in config["onnx"]["variants"] else "fp32"
            assert m.variant == expected
            assert (
                sample(
                    samples,
                    "nlpserve_model_info",
                    model=m.name,
                    version=m.version,
                    kind=config["kind"],
                    provider=m.execution_provider,
                    variant=expected,
                )
                == 1
            )
        assert stub.Classify(pb.ClassifyRequest(texts=["good"]), timeout=30).results
        assert stub.Generate(gen_request(4), timeout=30).usage.generated_tokens >= 1


def test_a_corrupt_model_file_fails_start_up_with_one_line(models, tmp_path: Path):
    import shutil

    repo = tmp_path / "models"
    shutil.copytree(models, repo)
    (repo / "docgpt" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(RuntimeError) as exc:
        ServerProcess(repo).start()
    message = str(exc.value)
    assert "exited with 1" in message
    assert "cannot load model docgpt" in message and "Traceback" not in message
