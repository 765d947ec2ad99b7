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
