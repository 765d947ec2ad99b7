"""End-to-end tests: the real server (`python -m server`) on port 0, talked to over loopback with the raw
nlpserve.v1 stubs. Each module starts its own server once (a few seconds with the quick models)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from e2e_util import start

from client.proto import inference_pb2_grpc
from server.process import ServerProcess


@pytest.fixture(scope="session")
def models(request: pytest.FixtureRequest) -> Path:
    """The model repository under test: the quick demo models, or NLPSERVE_TEST_MODELS (e.g. the full demo)."""
    other = os.environ.get("NLPSERVE_TEST_MODELS")
    return Path(other) if other else request.getfixturevalue("quick_repo")


@pytest.fixture(scope="module")
def srv(models: Path) -> Iterator[ServerProcess]:
    """The server with its default settings (modules that need others start their own)."""
    with start(models) as running:
        yield running


@pytest.fixture(scope="module")
def channel(srv: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(srv.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(channel)
