"""Core tests of the server: no gRPC. `async def` tests run on a fresh asyncio loop each."""

from __future__ import annotations

import asyncio
import inspect
import os
from pathlib import Path

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    # A ten-line runner instead of a pytest-asyncio dependency; the timeout turns a hang into a failure.
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), 60))
        return True
    return None


@pytest.fixture(scope="session")
def models(request: pytest.FixtureRequest) -> Path:
    """The model repository under test: the quick demo models, or NLPSERVE_TEST_MODELS (e.g. the full demo)."""
    other = os.environ.get("NLPSERVE_TEST_MODELS")
    return Path(other) if other else request.getfixturevalue("quick_repo")


@pytest.fixture(scope="session")
def classifier_config(models: Path):
    from server.repository import CLASSIFIER, scan

    return next(c for c in scan(models) if c.kind == CLASSIFIER)


@pytest.fixture(scope="session")
def generator_config(models: Path):
    from server.repository import GENERATOR, scan

    return next(c for c in scan(models) if c.kind == GENERATOR)


@pytest.fixture(scope="session")
def generator(generator_config):
    """The quick generator on the CPU provider, shared (it holds no per-request state)."""
    from server.config import Device
    from server.generation.model import GeneratorModel
    from server.runtime import Session

    return GeneratorModel(generator_config, Session(generator_config.model_file("fp32")[1], Device.CPU))


@pytest.fixture(scope="session")
def classifier(classifier_config):
    from server.classify import ClassifierModel
    from server.config import Device
    from server.runtime import Session

    session = Session(classifier_config.model_file("fp32")[1], Device.CPU)
    return ClassifierModel(classifier_config, session, max_texts_per_request=16, max_batch_size=4)
