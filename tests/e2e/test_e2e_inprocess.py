"""serve() in-process (its own event loop in a thread, a fresh metrics registry): health transitions while
models load, requests during loading, and the stop that ends serve() with exit code 0.

Model loading is held on an event (the real loader runs once it is released), so the loading phase can be
observed without timing."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.error
import urllib.request

import grpc
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from client.proto import inference_pb2 as pb
from client.proto import inference_pb2_grpc
from server import app
from server.config import load_settings
from server.errors import StartupError
from server.servicers.oip import grpc_service_pb2 as oip_pb
from server.servicers.oip import grpc_service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    def __init__(self, settings, registry: CollectorRegistry) -> None:
        self.settings, self.registry = settings, registry
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.exit_code: int | None = None
        self.ready = threading.Event()
        self.ports: list[int] = []  # gRPC, metrics, HTTP (-1: off), once ready
        self.thread = threading.Thread(target=self._main)

    def _main(self) -> None:
        async def go() -> int:
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            return await app.serve(
                self.settings, self.registry, self.stop_event,
                on_ready=lambda *ports: (self.ports.extend(ports), self.ready.set()),
            )

        self.exit_code = asyncio.run(go())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)


def test_health_transitions_and_requests_while_loading(models, monkeypatch):
    release = threading.Event()
    real_load = app.load_model

    def held_load(*args):
        assert release.wait(60)
        return real_load(*args)

    monkeypatch.setattr(app, "load_model", held_load)
    port = free_port()
    settings = load_settings(
        ["--models", str(models), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
         "--http-port", "-1"], {}
    )
    registry = CollectorRegistry()
    srv = InProcessServer(settings, registry)
    srv.thread.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return health.Check(request, timeout=30, wait_for_ready=True).status

            # Loading: the port is open, everything is NOT_SERVING, requests get UNAVAILABLE (not NOT_FOUND).
            for service in ("", "nlpserve.v1.InferenceService", "sentiment", "docgpt"):
                assert status(service) == NOT_SERVING
            for call in (
                lambda: stub.Classify(pb.ClassifyRequest(texts=["x"]), timeout=10),
                lambda: stub.Generate(pb.GenerateRequest(model="docgpt", prompt="x"), timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as exc:
                    call()
                assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
            assert not srv.ready.is_set()

            release.set()
            assert srv.ready.wait(60)
            for service in ("", "nlpserve.v1.InferenceService", "sentiment", "docgpt"):
                assert status(service) == SERVING
            assert stub.Classify(pb.ClassifyRequest(texts=["fine"]), timeout=30).results
            labels = {"model": "sentiment", "method": "Classify", "code": "OK"}
            assert registry.get_sample_value("nlpserve_requests_total", labels) == 1
            unavailable = {"model": "", "method": "Classify", "code": "UNAVAILABLE"}
            assert registry.get_sample_value("nlpserve_requests_total", unavailable) == 1

            srv.stop()
            assert srv.exit_code == 0
    finally:
        release.set()
        if srv.thread.is_alive():
            srv.stop()


def test_port_in_use_fails_at_start(models):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = load_settings(
            ["--models", str(models), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
             "--http-port", "-1"], {}
        )
        with pytest.raises(StartupError, match=f"--port {port}"):
            asyncio.run(app.serve(settings, CollectorRegistry()))


def test_unexpected_error_is_internal_generic_and_logged(models, monkeypatch, caplog):
    from server.classify import ClassifierModel

    real_run = ClassifierModel.run

    def run(self, requests):
        if any("boom" in t for r in requests for t in r.texts):
            raise RuntimeError("secret detail of the failure")
        return real_run(self, requests)

    monkeypatch.setattr(ClassifierModel, "run", run)  # fault injection into the real model
    port = free_port()
    settings = load_settings(
        ["--models", str(models), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
         "--http-port", "-1"], {}
    )
    srv = InProcessServer(settings, CollectorRegistry())
    srv.thread.start()
    try:
        assert srv.ready.wait(120)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as exc:
                stub.Classify(pb.ClassifyRequest(texts=["boom"]), timeout=30)
            assert exc.value.code() is grpc.StatusCode.INTERNAL
            assert "secret" not in exc.value.details()
            assert stub.Classify(pb.ClassifyRequest(texts=["fine"]), timeout=30).results  # still serving
        assert "secret detail of the failure" in caplog.text  # the details went to the log
        assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
    finally:
        srv.stop()
    assert srv.exit_code == 0


def test_a_failed_device_turns_the_whole_server_not_serving(models, monkeypatch):
    """A CUDA error that leaves the device unusable (injected where ONNX Runtime would raise it: only a GPU
    raises it for real) fails the request with UNAVAILABLE; the model, the whole server's health, HTTP /health
    and the OIP's ServerReady turn NOT_SERVING, so that probes take the replica out and restart it; the other
    model still answers."""
    broken = threading.Event()
    real_run, real_bound = ort.InferenceSession.run, ort.InferenceSession.run_with_iobinding

    def failing(real):
        def run(self, *args, **kwargs):
            if broken.is_set() and any(o.name.startswith("present") for o in self.get_outputs()):
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access")
            return real(self, *args, **kwargs)

        return run

    monkeypatch.setattr(ort.InferenceSession, "run", failing(real_run))
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", failing(real_bound))
    port = free_port()
    settings = load_settings(
        ["--models", str(models), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
         "--http-port", "0"], {}
    )
    srv = InProcessServer(settings, CollectorRegistry())

    def http_status() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{srv.ports[2]}/health", timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    srv.thread.start()
    try:
        assert srv.ready.wait(120)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert http_status() == 200 and oip.ServerReady(oip_pb.ServerReadyRequest(), timeout=30).ready
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == SERVING

            broken.set()
            with pytest.raises(grpc.RpcError) as exc:
                stub.Generate(pb.GenerateRequest(model="docgpt", prompt="def"), timeout=30)
            assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
            assert next(watch).status == NOT_SERVING  # the next change of "": no polling, no timing
            watch.cancel()
            for service in ("", "nlpserve.v1.InferenceService", "docgpt"):
                request = health_pb2.HealthCheckRequest(service=service)
                assert health.Check(request, timeout=30).status == NOT_SERVING, service
            assert health.Check(health_pb2.HealthCheckRequest(service="sentiment"), timeout=30).status == SERVING
            assert http_status() == 503
            assert not oip.ServerReady(oip_pb.ServerReadyRequest(), timeout=30).ready
            with pytest.raises(grpc.RpcError) as exc:  # refused at once, the device untouched
                stub.Generate(pb.GenerateRequest(model="docgpt", prompt="def"), timeout=30)
            assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
            assert stub.Classify(pb.ClassifyRequest(texts=["fine"]), timeout=30).results  # the other model
    finally:
        broken.clear()
        srv.stop()
    assert srv.exit_code == 0
