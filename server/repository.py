"""Reads the model repository (docs/model-repository.md, format version 1): one folder per model, one
sub-folder per version; the highest version present is served."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from .errors import StartupError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CLASSIFIER = "classifier"
GENERATOR = "generator"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One model version's config.json, the parts the server uses."""

    name: str
    version: int
    kind: str
    path: Path  # the version folder
    max_sequence_length: int
    special_tokens: dict[str, int | None]
    architecture: dict[str, Any]
    onnx_inputs: tuple[str, ...]
    onnx_outputs: tuple[str, ...]
    variants: dict[str, str]
    batching: dict[str, Any]
    labels: tuple[str, ...] = ()
    pooling: str = "cls"
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def model_file(self, variant: str) -> tuple[str, Path]:
        """The (variant, file) to load: the asked variant, or fp32 when this model lacks it."""
        if variant not in self.variants:
            log.warning(
                "model %s has no %s variant (has %s); using fp32",
                self.name,
                variant,
                ", ".join(sorted(self.variants)),
            )
            variant = "fp32"
        return variant, self.path / self.variants.get(variant, "model.onnx")

    @classmethod
    def read(cls, version_dir: Path) -> ModelConfig:
        path = version_dir / "config.json"
        try:
            raw = json.loads(path.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise StartupError(
                    f"{path}: format_version {raw.get('format_version')!r}, this server reads "
                    f"{FORMAT_VERSION}"
                )
            kind = raw["kind"]
            if kind not in (CLASSIFIER, GENERATOR):
                raise StartupError(f"{path}: unknown kind {kind!r}")
            onnx = raw["onnx"]
            config = cls(
                name=raw["name"],
                version=int(raw["version"]),
                kind=kind,
                path=version_dir,
                max_sequence_length=int(raw["max_sequence_length"]),
                special_tokens=dict(raw.get("special_tokens", {})),
                architecture=dict(raw.get("architecture", {})),
                onnx_inputs=tuple(onnx["inputs"]),
                onnx_outputs=tuple(onnx["outputs"]),
                variants=dict(onnx.get("variants") or {"fp32": "model.onnx"}),
                batching=dict(raw.get("batching", {})),
                labels=tuple(raw.get("labels", ())),
                pooling=raw.get("pooling", "cls"),
                generation=dict(raw.get("generation", {})),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"{path}: cannot read the model config ({type(exc).__name__}: {exc})") from exc
        if config.name != version_dir.parent.name:
            raise StartupError(
                f"{path}: name {config.name!r} differs from its folder {version_dir.parent.name!r}"
            )
        if kind == CLASSIFIER and not config.labels:
            raise StartupError(f"{path}: a classifier needs labels")
        return config


def scan(models_dir: Path) -> list[ModelConfig]:
    """The highest version of every model under `models_dir`, sorted by name."""
    if not models_dir.is_dir():
        raise StartupError(f"--models {models_dir}: not a directory")
    configs = []
    for model_dir in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
        if not versions:
            log.warning("skipping %s: no version folder", model_dir)
            continue
        configs.append(ModelConfig.read(max(versions, key=lambda p: int(p.name))))
    if not configs:
        raise StartupError(f"--models {models_dir}: no model found (expected NAME/VERSION/config.json)")
    return configs
