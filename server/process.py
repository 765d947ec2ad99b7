"""ServerProcess: the real server in a child process on free ports, for tests, benchmarks and deployment
checks. It waits for the ready file (written once every model is warmed up and SERVING).

    with ServerProcess(models_dir, args=["--max-batch-size", "1"]) as srv:
        stub = InferenceServiceStub(grpc.insecure_channel(srv.target))
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """`python -m server --models DIR --port 0 --metrics-port 0 --http-port 0 [args]` in a child process.

    `env` adds to (or overrides) the current environment. Entering the context waits up to
    `startup_timeout` seconds for SERVING; leaving it stops the server (SIGTERM, then SIGKILL).
    """

    def __init__(
        self,
        models_dir: str | os.PathLike,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 120.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.models_dir = Path(models_dir)
        self.args = list(args)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.host = host
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = 0  # -1 when args turn it off (--http-port -1)
        self.pid = 0
        self._dir = tempfile.TemporaryDirectory(prefix="nlpserve-")
        self._log_path = Path(self._dir.name) / "server.log"
        self._ready = Path(self._dir.name) / "ready.json"
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def http_url(self) -> str:
        """The HTTP port's base URL (the OpenAI-compatible API is under /v1); https with --tls-cert."""
        scheme = "https" if "--tls-cert" in self.args or "NLPSERVE_TLS_CERT" in self.env else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    def start(self) -> Self:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        cmd = [
            sys.executable, "-m", "server", "--models", str(self.models_dir), "--host", self.host,
            "--port", "0", "--metrics-port", "0", "--http-port", "0",
            "--ready-file", str(self._ready), *self.args,
        ]  # fmt: skip
        self._log = self._log_path.open("wb")
        # Output to a file, not a pipe: a pipe nobody reads would block the server once full.
        self._proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready.exists():
            if self._proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self._proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"the server was not SERVING after {self.startup_timeout}s:\n{self.logs()}"
                )
            time.sleep(0.05)
        info = json.loads(self._ready.read_text())
        self.grpc_port, self.metrics_port, self.pid = info["grpc_port"], info["metrics_port"], info["pid"]
        self.http_port = info.get("http_port", -1)
        return self

    def send_signal(self, sig: int) -> None:
        if self._proc is not None:
            self._proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the process to exit; returns its exit code (raises subprocess.TimeoutExpired)."""
        assert self._proc is not None, "not started"
        return self._proc.wait(timeout)

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def logs(self) -> str:
        """What the server wrote so far (stdout and stderr)."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self._proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._dir.cleanup()
