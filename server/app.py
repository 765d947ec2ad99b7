"""serve(): the grpc.aio server and the standard parts around the core, wired in one place: the inference
servicer, health (grpc.health.v1), reflection, the Prometheus endpoint, the OpenAI-compatible HTTP API
(uvicorn, on this same event loop), signals and the graceful drain.

Life of the process:
1. the gRPC port opens at once with every health service NOT_SERVING, so orchestrators can watch start-up;
   then the HTTP port (its /health answers 503 until step 2 ends);
2. each model loads (its execution provider checked) and warms up off the event loop; once all have, every
   model's health service, then "" and nlpserve.v1.InferenceService, turn SERVING and the ready file is written;
3. on SIGTERM or SIGINT every health service turns NOT_SERVING; after `drain_delay_seconds` (0 by default) of
   serving on, so that load balancers can notice, new requests get UNAVAILABLE (503 over HTTP), in-flight
   requests and streams of both ports get `grace_seconds` to finish, then the server stops and the process
   exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from client.proto import inference_pb2

from .config import Settings
from .errors import StartupError
from .http import HttpServer
from .metrics import Metrics
from .models import ModelHub, load_model, share_mixed_threads
from .repository import scan
from .security import ApiKeyInterceptor, api_key_interceptors, load_tls
from .servicers.inference import InferenceServicer
from .servicers.kserve import SERVICE as KSERVE_SERVICE
from .servicers.kserve import KServeServicer
from .servicers.openai_http import OpenAIFront
from .servicers.status import Gate, add_to_server

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the drain, how long gRPC's own stop lets calls that arrived meanwhile reach their handler (which refuses
# them with UNAVAILABLE) before it cancels whatever is left.
STOP_GRACE_SECONDS = 1.0


def write_ready_file(path: Path, grpc_port: int, metrics_port: int, http_port: int = -1) -> None:
    """Writes the ready file atomically: a reader sees either nothing or the whole JSON."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ports = {"grpc_port": grpc_port, "metrics_port": metrics_port, "http_port": http_port}
    tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
    os.replace(tmp, path)


async def serve(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int, int], None] | None = None,
) -> int:
    """Runs the server until SIGTERM/SIGINT (or `stop` is set); returns the process exit code.

    `registry`, `stop` and `on_ready(grpc_port, metrics_port, http_port)` let tests run it in-process (a port
    that is off is -1).
    """
    configs = scan(settings.models)  # a bad repository fails before any port opens
    metrics = Metrics(registry)
    # So do bad TLS files and API keys. A call refused for its key is counted like any other.
    tls = load_tls(settings)
    interceptors = api_key_interceptors(
        settings,
        os.environ,
        tls_on=tls is not None,
        on_refused=lambda method: metrics.requests.labels("", method, "UNAUTHENTICATED").inc(),
    )
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (in-process tests)
            pass

    metrics_port, httpd = -1, None
    if settings.metrics_port >= 0:
        try:
            httpd, _ = start_http_server(
                settings.metrics_port,
                addr=settings.host,
                registry=metrics.registry,
                **(tls.http_server_args() if tls is not None else {}),
            )
        except OSError as exc:
            raise StartupError(f"--metrics-port {settings.metrics_port}: {exc.strerror or exc}") from exc
        metrics_port = httpd.server_port

    limit = settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # port 0 and a busy port must mean what they say
        ],
    )
    health = HealthServicer()

    def unhealthy(name: str) -> None:  # from a worker thread: the model's device failed
        asyncio.run_coroutine_threadsafe(device_lost(name), loop)

    async def device_lost(name: str) -> None:
        # A failed device needs a new process: the model, and with it the whole server, turn NOT_SERVING (HTTP
        # /health 503, ServerReady false), so that readiness takes the replica out of rotation and liveness
        # restarts it. Until then the other models answer whatever still reaches them.
        if front is not None:
            front.serving = False
        for service in (name, SERVICE_NAME, ""):
            await health.set(service, NOT_SERVING)

    hub, gate = ModelHub(loading=tuple(c.name for c in configs), on_unhealthy=unhealthy), Gate()
    servicer = InferenceServicer(hub, metrics, gate, settings.unread_stream_seconds)
    add_to_server(servicer, inference_pb2.DESCRIPTOR.services_by_name["InferenceService"], server)
    # The Open Inference Protocol (KServe v2, Triton's gRPC) on the same port and the same hub: shared batches.
    add_to_server(KServeServicer(hub, metrics, gate, settings.unread_stream_seconds), KSERVE_SERVICE, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            KSERVE_SERVICE.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    services = ["", SERVICE_NAME, *(c.name for c in configs)]
    for name in services:
        await health.set(name, NOT_SERVING)
    try:
        address = f"{settings.host}:{settings.port}"
        if tls is not None:
            grpc_port = server.add_secure_port(address, tls.grpc_credentials())
        else:
            grpc_port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind ...")
        grpc_port = 0
        log.debug("bind failed: %s", exc)
    if grpc_port == 0:
        if httpd is not None:
            httpd.shutdown()
        raise StartupError(
            f"--port {settings.port}: cannot listen on {settings.host}:{settings.port} (in use?)"
        )
    await server.start()
    http_port, http, front = -1, None, None
    if settings.http_port >= 0:
        keys = next((i for i in interceptors if isinstance(i, ApiKeyInterceptor)), None)
        front = OpenAIFront(
            hub,
            metrics,
            gate,
            max_body_bytes=limit,
            unread_timeout=settings.unread_stream_seconds,
            authorized=None if keys is None else lambda value: keys.authorized([("authorization", value)]),
        )
        http = HttpServer(front.app(), settings.host, settings.http_port, tls)
        try:
            http_port = await http.start()
        except StartupError:
            await server.stop(0)
            if httpd is not None:
                httpd.shutdown()
            raise
    log.info(
        "gRPC on %s:%d, metrics on port %d, HTTP (OpenAI API) on port %d; loading %d models",
        settings.host,
        grpc_port,
        metrics_port,
        http_port,
        len(configs),
    )

    try:
        share_mixed_threads(configs, settings)
        for config in configs:
            if stop.is_set():
                break
            served = await asyncio.to_thread(load_model, config, settings, metrics)
            hub.add(served)
    except Exception as exc:  # a StartupError says what is wrong; anything else (a corrupt .onnx) too
        if isinstance(exc, StartupError):
            log.error("%s", exc)
        else:
            log.error("cannot load model %s: %s: %s", config.name, type(exc).__name__, exc)
            log.debug("load failure", exc_info=True)
        await server.stop(0)
        if http is not None:
            await http.stop(0)
        if httpd is not None:
            httpd.shutdown()
        return 1
    hub.start()
    if not stop.is_set():
        for name in services[::-1]:  # the models first, the whole server last
            await health.set(name, SERVING)
        if front is not None:
            front.serving = True
        log.info("SERVING %s", ", ".join(f"{m.name} ({m.description.provider})" for m in hub.models.values()))
        if settings.ready_file is not None:
            write_ready_file(settings.ready_file, grpc_port, metrics_port, http_port)
        if on_ready is not None:
            on_ready(grpc_port, metrics_port, http_port)

    await stop.wait()
    started = time.monotonic()
    await health.enter_graceful_shutdown()
    gate.stopping = True  # the Open Inference Protocol's ServerReady / ModelReady: false from now on
    if front is not None:
        front.serving = False  # /health: 503, like gRPC health's NOT_SERVING
    # A second signal during the drain cuts it short (an impatient Ctrl-C, or an orchestrator's retry).
    force = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, force.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    forced = asyncio.ensure_future(force.wait())
    if settings.drain_delay_seconds > 0 and not force.is_set():
        # A load balancer that polls health needs a moment to stop routing here; calls it already sent would
        # fail if refused now, since a proxy cannot retry a call once it has forwarded it.
        log.info("NOT_SERVING; still serving for %.1fs before draining", settings.drain_delay_seconds)
        await asyncio.wait({forced}, timeout=settings.drain_delay_seconds)
    log.info(
        "draining: NOT_SERVING, refusing new requests, %d in flight, grace %.1fs",
        gate.in_flight,
        settings.grace_seconds,
    )
    gate.draining = True
    idle = asyncio.ensure_future(gate.wait_idle(settings.grace_seconds))
    await asyncio.wait({idle, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if not (idle.done() and idle.result()):
        idle.cancel()
        reason = "a second signal" if force.is_set() else "grace period over"
        log.warning("%s: cancelling %d requests still in flight", reason, gate.in_flight)
    # Not stop(0): a call that reached gRPC just now but whose handler has not run yet would be cancelled
    # (CANCELLED, which retry policies do not retry); given a moment, its handler answers UNAVAILABLE.
    stop_grace = 0 if force.is_set() else STOP_GRACE_SECONDS
    await asyncio.gather(server.stop(stop_grace), *([http.stop(stop_grace)] if http is not None else []))
    await hub.close()
    if httpd is not None:
        httpd.shutdown()
    log.info("stopped after a %.2fs drain", time.monotonic() - started)
    return 0
