"""One real server on the quick models, shared by the client's end-to-end tests (port 0, loopback)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def client_server(quick_repo: Path) -> Iterator[object]:
    """A running server (`server.process.ServerProcess`) on the quick models: `sentiment` and `docgpt`."""
    from server.process import ServerProcess  # the server's dependencies: only the e2e tests need them

    with ServerProcess(quick_repo) as srv:
        yield srv


@pytest.fixture(scope="session")
def target(client_server) -> str:
    """The running server's "127.0.0.1:PORT"."""
    return client_server.target


class RecordingStream(io.StringIO):
    """Remembers what had been written at every flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


@pytest.fixture
def recording() -> RecordingStream:
    """A text stream for the CLI's output that remembers what had been written at every flush."""
    return RecordingStream()
