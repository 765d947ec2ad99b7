"""Writes the model repository layout of docs/model-repository.md, atomically.

Everything is written into a temporary folder next to `--out` and renamed into place at the end, so that a
failed or interrupted export leaves nothing half-written where the server looks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from export.errors import ExportError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
OPSET = 18
VARIANT_FILES = {"fp32": "model.onnx", "opt": "model.opt.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

CLASSIFIER_BATCHING = {"max_batch_size": 32, "max_queue_delay_ms": 5.0, "max_queue_size": 1024}
GENERATOR_BATCHING = {"max_batch_size": 16, "max_queue_delay_ms": 5.0, "max_queue_size": 1024, "max_active_sequences": 16}


def check_output(out: Path, force: bool) -> None:
    """Fails early, before any training, when `out` exists and may not be replaced."""
    if out.exists() and not force:
        raise ExportError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write into {parent}")


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yields an empty temporary folder next to `out`; moves it to `out` when the block succeeds (replacing an
    existing `out` only with `force`) and removes it when the block fails."""
    check_output(out, force)
    out = out.resolve()
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # removed again on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot create a folder next to {out}: {exc.strerror}") from None
    try:
        yield stage
        stage.chmod(0o755)  # mkdtemp makes it private; a model repository is meant to be read by the server
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
            for folder in created:  # innermost first; only the ones this call made, and only if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
    logger.info("wrote %s", out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "tokenizers", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def provenance(source: str, data: str, command: list[str] | None = None) -> dict[str, Any]:
    argv = command if command is not None else [Path(sys.executable).name, "-m", "export", *sys.argv[1:]]
    return {
        "source": source,
        "data": data,
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "command": shlex.join(argv),
        "versions": library_versions(),
    }
