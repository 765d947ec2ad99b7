"""Shared fixtures. Tiny models are built once per test session, with the project's own exporter, in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Nothing downloads at run time, in tests least of all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def quick_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with the quick demo models: classifier `sentiment`, generator `docgpt`."""
    out = tmp_path_factory.mktemp("repo") / "models"
    result = subprocess.run(
        [sys.executable, "-m", "export", "demo", "--quick", "--out", str(out)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"export demo --quick failed:\n{result.stdout}\n{result.stderr}"
    return out
