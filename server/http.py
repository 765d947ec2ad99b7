"""The HTTP port (`--http-port`): uvicorn serving an ASGI app on the server's own event loop, beside gRPC.

No second process or thread: `uvicorn.Server.serve()` runs as a task of the loop that runs gRPC and the
core, so a handler awaits ModelHub directly. The socket is bound here, not by uvicorn, so that port 0 works
(the port is read back) and a busy port is a StartupError naming the flag (uvicorn would `sys.exit`). TLS and
mTLS use the server's `--tls-cert`, `--tls-key` and `--tls-client-ca`. Signals stay with `serve()` (its
drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn

from .errors import StartupError
from .security import Tls

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: it would replace serve()'s, and re-raise the signal in
    the process when it stops (vLLM's NoSignalServer does the same)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise StartupError(
            f"--http-port {port}: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    sock.setblocking(False)
    return sock


class HttpServer:
    """An ASGI app on `host:port`, served by uvicorn on the running event loop."""

    def __init__(self, app: object, host: str, port: int, tls: Tls | None = None) -> None:
        tls_args = {}
        if tls is not None:
            tls_args = {
                "ssl_certfile": str(tls.cert_file),
                "ssl_keyfile": str(tls.key_file),
                "ssl_ca_certs": str(tls.client_ca_file) if tls.client_ca_file else None,
                "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
            }
        self._config = uvicorn.Config(
            app,
            # h11 whatever else is installed: one HTTP implementation, whose disconnect handling is tested.
            http="h11",
            ws="none",  # no WebSocket routes
            lifespan="off",
            log_config=None,  # the server's logging, not uvicorn's
            access_log=False,
            server_header=False,
            **tls_args,
        )
        self._host, self._port = host, port
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None
        self.port = -1

    async def start(self) -> int:
        """Binds the port and starts serving; returns the port (raises StartupError)."""
        self._config.load()  # the TLS context: the files were checked already (security.load_tls)
        sock = _bind(self._host, self._port)
        self.port = sock.getsockname()[1]
        self._server = _Uvicorn(self._config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        return self.port

    async def stop(self, grace: float) -> None:
        """Stops accepting connections, lets requests still running `grace` seconds to finish (closing idle
        keep-alive connections at once), then cancels what is left."""
        if self._server is None or self._task is None:
            return
        self._config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            log.exception("the HTTP server failed while stopping")
