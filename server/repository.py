"""Reads the model repository (docs/model-repository.md, format versions 1 and 2): one folder per model, one
sub-folder per version; the highest version present is served."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from .errors import StartupError

log = logging.getLogger(__name__)

# Version 2 adds shared-buffer (GroupQueryAttention) decoders, several end-of-sequence ids, chat templates and
# a per-model default variant; every version-1 file is also read as it always was.
FORMAT_VERSIONS = (1, 2)
# Generator graph contracts (`onnx.kv_cache`): present = past + new tokens, or past and present in one buffer.
KV_CONCAT = "concat"
KV_SHARED_BUFFER = "shared_buffer"
CLASSIFIER = "classifier"
GENERATOR = "generator"
EMBEDDER = "embedder"
TOKEN_CLASSIFIER = "token_classifier"
KINDS = (CLASSIFIER, EMBEDDER, TOKEN_CLASSIFIER, GENERATOR)
ENCODERS = (CLASSIFIER, EMBEDDER, TOKEN_CLASSIFIER)  # batched by the dynamic batcher
POOLINGS = ("cls", "mean", "max")
# Numbers of config.json checked at start-up, like the command-line flags: (field, least value, integer only).
_NUMBERS = (
    ("version", 1, True),
    ("max_sequence_length", 1, True),
    ("batching.max_batch_size", 1, True),
    ("batching.max_queue_delay_ms", 0, False),
    ("batching.max_queue_size", 1, True),
    ("batching.max_active_sequences", 1, True),
    ("batching.kv_cache_tokens", 1, True),
    ("generation.max_new_tokens", 1, True),
    ("generation.default_max_new_tokens", 1, True),
    ("architecture.num_layers", 1, True),
    ("architecture.num_heads", 1, True),
    ("architecture.num_kv_heads", 1, True),
    ("architecture.head_size", 1, True),
    ("architecture.vocab_size", 1, True),
    ("architecture.tokenizer_vocab_size", 1, True),
)
_SECTIONS = ("onnx", "batching", "generation", "architecture", "special_tokens")


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
    normalize: bool = False  # embedders: the graph L2-normalizes its vectors
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    kv_cache: str = KV_CONCAT
    default_variant: str = "fp32"
    # Shared-buffer decoders: each variant's mixed-step graph (decode rows and a prompt chunk in one call)
    mixed_steps: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def model_file(self, variant: str | None) -> tuple[str, Path]:
        """The (variant, file) to load: the asked variant (None: the model's default), or fp32 when this model
        lacks it."""
        variant = variant or self.default_variant
        if variant not in self.variants:
            log.warning(
                "model %s has no %s variant (has %s); using fp32",
                self.name,
                variant,
                ", ".join(sorted(self.variants)),
            )
            variant = "fp32"
        return variant, self.path / self.variants.get(variant, "model.onnx")

    def mixed_step_file(self, variant: str) -> Path | None:
        """The variant's mixed-step graph (export/mixed_step.py), when the export wrote one and it is there."""
        name = self.mixed_steps.get(variant)
        return self.path / name if name and (self.path / name).is_file() else None

    @classmethod
    def read(cls, version_dir: Path) -> ModelConfig:
        path = version_dir / "config.json"
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise StartupError(f"{path}: not a JSON object")
            _check_fields(path, raw)
            if raw.get("format_version") not in FORMAT_VERSIONS:
                raise StartupError(
                    f"{path}: format_version {raw.get('format_version')!r}, this server reads "
                    f"{' and '.join(map(str, FORMAT_VERSIONS))}"
                )
            kind = raw["kind"]
            if kind not in KINDS:
                raise StartupError(f"{path}: unknown kind {kind!r} (this server serves {', '.join(KINDS)})")
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
                pooling=raw.get("pooling", "mean" if kind == EMBEDDER else "cls"),
                normalize=raw.get("normalize", False),
                generation=dict(raw.get("generation", {})),
                kv_cache=onnx.get("kv_cache", KV_CONCAT),
                default_variant=onnx.get("default_variant", "fp32"),
                mixed_steps=dict(onnx.get("mixed_step") or {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"{path}: cannot read the model config ({type(exc).__name__}: {exc})") from exc
        if config.name != version_dir.parent.name:
            raise StartupError(
                f"{path}: name {config.name!r} differs from its folder {version_dir.parent.name!r}"
            )
        if kind in (CLASSIFIER, TOKEN_CLASSIFIER) and not config.labels:
            raise StartupError(f"{path}: a {kind} needs labels")
        if config.kv_cache not in (KV_CONCAT, KV_SHARED_BUFFER):
            raise StartupError(
                f"{path}: onnx.kv_cache {config.kv_cache!r}, expected {KV_CONCAT!r} or {KV_SHARED_BUFFER!r}"
            )
        if config.default_variant not in config.variants:
            raise StartupError(f"{path}: onnx.default_variant {config.default_variant!r} is not in onnx.variants")
        return config


def _check_fields(path: Path, raw: dict[str, Any]) -> None:
    """One line naming the file and the field for a value the server cannot serve with (a negative queue size
    would refuse every call, 0 active sequences would hang every Generate)."""

    def bad(field: str, value: Any, want: str) -> StartupError:
        return StartupError(f"{path}: {field} is {json.dumps(value)[:60]}, must be {want}")

    for section in _SECTIONS:
        if section in raw and not isinstance(raw[section], dict):
            raise bad(section, raw[section], "an object")
    for field, least, integer in _NUMBERS:
        section, _, key = field.rpartition(".")
        holder = raw.get(section, {}) if section else raw
        if key not in holder or (holder[key] is None and section == "architecture"):
            continue
        value = holder[key]
        number = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or not math.isfinite(value) or value < least:
            raise bad(field, value, f"{'an integer' if integer else 'a number'} of at least {least}")
    eos = raw.get("generation", {}).get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
        raise bad("generation.eos_token_ids", eos, "a list of token ids")
    for name, value in raw.get("special_tokens", {}).items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise bad(f"special_tokens.{name}", value, "a token id or null")
    labels = raw.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise bad("labels", labels, "a list of strings")
    if raw.get("kind") in (CLASSIFIER, EMBEDDER) and raw.get("pooling", "cls") not in POOLINGS:
        raise bad("pooling", raw.get("pooling"), '"cls", "mean" or "max"')
    if not isinstance(raw.get("normalize", False), bool):
        raise bad("normalize", raw.get("normalize"), "true or false")


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
