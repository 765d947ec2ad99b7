"""The model repositories the benchmarks serve, built with the project's own exporter (`python -m export`) into
a git-ignored cache, `.cache/bench-models/`, once; a later run reuses them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import ROOT

logger = logging.getLogger(__name__)

CACHE = ROOT / ".cache" / "bench-models"

# The two sizes users serve, random weights (speed does not depend on them), real exports.
BERT_BASE = "bert-base"
GPT2_SMALL = "gpt2-small"


class BuildError(RuntimeError):
    pass


def _export(args: list[str], out: Path, timeout: float = 3600) -> None:
    """Runs `python -m export ARGS --out TMP` and renames TMP to `out` once it succeeded, so that a failed or
    interrupted build leaves no half-built folder behind."""
    # the exporter names a model after its folder: build into a folder of the same name, elsewhere
    staging = out.parent / f".building-{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    tmp = staging / out.name
    command = [sys.executable, "-m", "export", *args, "--out", str(tmp)]
    logger.info("building: %s", " ".join(command[1:]))
    t0 = time.perf_counter()
    # OMP passive wait: PyTorch's spinning threads crawl on a busy machine (see bench/__main__.py)
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tmp.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise BuildError(f"python -m export {' '.join(args)} failed: {' | '.join(tail)}")
    logger.info("built %s in %.0f s", out, time.perf_counter() - t0)
    if args[0] != "demo":
        _check_name(tmp, out.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    staging.rmdir()


def _check_name(model: Path, name: str) -> None:
    """The model's config must carry its folder's name (an exporter that staged its output elsewhere wrote the
    staging folder's name into config.json: corrected here, with a warning)."""
    for config_path in model.glob("*/config.json"):
        config = json.loads(config_path.read_text())
        if config.get("name") != name:
            logger.warning("%s: the exporter named the model %r; corrected to %r", config_path, config.get("name"), name)
            config["name"] = name
            config_path.write_text(json.dumps(config, indent=2) + "\n")


def has_model(repository: Path, name: str) -> bool:
    return any((repository / name).glob("*/config.json"))


def quick_repository(rebuild: bool = False) -> Path:
    """The quick demo models (`sentiment`, `docgpt`), built in seconds."""
    repo = CACHE / "quick"
    if rebuild or not (has_model(repo, "sentiment") and has_model(repo, "docgpt")):
        shutil.rmtree(repo, ignore_errors=True)
        _export(["demo", "--quick"], repo)
    return repo


def demo_repository(models: Path | None = None, rebuild: bool = False) -> Path:
    """The demo models: `--models DIR` when given, else `models/` when `make models` built it (it holds both demo
    models; older Makefiles also left a `.built` marker), else built here."""
    if models is not None:
        return models
    local = ROOT / "models"
    if (local / ".built").exists() or (has_model(local, "sentiment") and has_model(local, "docgpt")):
        return local
    repo = CACHE / "demo"
    if rebuild or not (has_model(repo, "sentiment") and has_model(repo, "docgpt")):
        shutil.rmtree(repo, ignore_errors=True)
        _export(["demo"], repo)
    return repo


def sized_repository(
    rebuild: bool = False, variant: str = "fp32", names: tuple[str, ...] = (BERT_BASE, GPT2_SMALL),
    kv_cache: str = "concat",
) -> Path:
    """A BERT-base-sized classifier (12 layers, hidden 768) and a GPT-2-small-sized generator (12 layers, hidden
    768, GPT-2's 50,257-token vocabulary and 1,024 positions: 124M parameters), random weights (speed does not
    depend on them), exported by the project's exporter. `kv_cache` "shared-buffer": the generator's graph is
    the slot cache's (`export generator --kv-cache shared-buffer`, the same weights: same seed, no training), in
    a repository of its own (`sized-slots`)."""
    repo = CACHE / ("sized" if kv_cache == "concat" else "sized-slots")
    extra = [] if variant == "fp32" else [VARIANT_FLAGS[variant]]
    generator_args = GENERATOR_ARGS + ([] if kv_cache == "concat" else ["--kv-cache", kv_cache])
    for name, args in ((BERT_BASE, CLASSIFIER_ARGS), (GPT2_SMALL, generator_args)):
        if name not in names:
            continue
        stale = name == GPT2_SMALL and kv_cache != "concat" and not has_mixed_step(repo, name, variant)
        if rebuild or not has_model(repo, name) or not has_variant(repo, name, variant) or stale:
            _export([*args, *extra], repo / name)
    return repo


VARIANT_FLAGS = {"fp16": "--fp16", "int8": "--int8", "opt": "--optimize"}


def _in_onnx_section(repository: Path, name: str, key: str, variant: str) -> bool:
    """Whether a built version of the model lists `variant` under config.json's `onnx.<key>`."""
    return any(
        variant in json.loads(config.read_text()).get("onnx", {}).get(key, {})
        for config in (repository / name).glob("*/config.json")
    )


def has_mixed_step(repository: Path, name: str, variant: str) -> bool:
    """Whether a shared-buffer generator has the variant's mixed-step graph, or cannot have one (int8): a cache
    built before GPT-2's exports wrote them (2026-12-04) is rebuilt rather than measured without mixed steps."""
    return variant == "int8" or _in_onnx_section(repository, name, "mixed_step", variant)


def has_variant(repository: Path, name: str, variant: str) -> bool:
    """Whether the built model has the variant's file (the exporter writes only the variants asked for)."""
    return _in_onnx_section(repository, name, "variants", variant)


CLASSIFIER_ARGS = [
    "classifier", "--scratch", "--layers", "12", "--heads", "12", "--hidden", "768", "--steps", "0",
    "--data", "builtin:sentiment",
]
GENERATOR_ARGS = [
    "generator", "--layers", "12", "--heads", "12", "--width", "768", "--context", "1024", "--vocab-size", "50257",
    "--steps", "0", "--corpus", "builtin:docstrings",
    # the parity check recomputes the whole sequence in PyTorch at every step: a few tokens prove the graph
    "--verify-tokens", "4",
]
