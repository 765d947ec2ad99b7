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


@pytest.fixture(scope="session")
def llm_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Llama and Qwen2 checkpoint folders (tests/llm_util.py: two end-of-sequence ids, a chat
    template), by architecture."""
    from llm_util import llm_checkpoint

    base = tmp_path_factory.mktemp("llm-checkpoints")
    for arch in ("llama", "qwen2"):
        llm_checkpoint(base / arch, arch)
    return {arch: base / arch for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def llm_repo(llm_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of the tiny checkpoints exported by the project's exporter: `tinyllama` (with its int4
    variant) and `tinyqwen` (with its fp16 variant), both shared-buffer decoders (format version 2)."""
    from llm_util import run_export

    out = tmp_path_factory.mktemp("llm-repo") / "models"
    for name, arch, extra in (("tinyllama", "llama", ["--int4"]), ("tinyqwen", "qwen2", ["--fp16"])):
        result = run_export("generator", "--import", str(llm_checkpoints[arch]), "--out", str(out / name), *extra)
        assert result.returncode == 0, f"export of {name} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def gpt2_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random GPT-2 checkpoint (tests/llm_util.py) exported twice: `gpt2concat` (torch.onnx's graph,
    the concatenating cache) and `gpt2slots` (`--kv-cache shared-buffer --int8 --fp16`: GroupQueryAttention on
    the slot cache)."""
    from llm_util import gpt2_checkpoint, run_export

    checkpoint = tmp_path_factory.mktemp("gpt2-checkpoint")
    gpt2_checkpoint(checkpoint)
    out = tmp_path_factory.mktemp("gpt2-repo") / "models"
    for name, extra in (("gpt2concat", ["--kv-cache", "concat"]),
                        ("gpt2slots", ["--kv-cache", "shared-buffer", "--int8", "--fp16"])):
        result = run_export("generator", "--import", str(checkpoint), *extra, "--out", str(out / name))
        assert result.returncode == 0, f"export of {name} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return out
