"""`python -m export generator`: train a byte-level BPE tokenizer and a GPT-2 decoder on a corpus (or import
a checkpoint), evaluate, export with the KV cache, verify, write the model folder."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import generator as gen
from export import gpt2_shared_buffer, variants
from export.errors import ExportError, VerificationError
from export.onnx_export import export_generator, generator_names
from export.repository import FORMAT_VERSION, GENERATOR_BATCHING, OPSET, VARIANT_FILES, provenance, write_json
from export.tokenization import EOS, special_ids, train_byte_bpe
from export.verify import generator_parity

logger = logging.getLogger(__name__)

PARITY_BOUND = 1e-4
VERIFY_TOKENS = 64


@dataclass(frozen=True, kw_only=True)
class GeneratorOptions:
    corpus: str | None = None  # the text; None only with import_dir
    corpus_description: str = ""
    name: str = "generator"
    version: int = 1
    import_dir: Path | None = None
    layers: int = 4
    heads: int = 4
    width: int = 256
    context: int = 256
    vocab_size: int = 8192
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0
    variants: tuple[str, ...] = ()
    verify_tokens: int = VERIFY_TOKENS
    # "concat": torch.onnx's graph, whose present is past + new (the concatenating cache, kv_cache.py);
    # "shared_buffer": the GroupQueryAttention graph of gpt2_shared_buffer.py (the slot cache, slot_cache.py).
    kv_cache: str = "concat"
    command: list[str] | None = None
    extra_provenance: dict[str, Any] = field(default_factory=dict)


def split_corpus(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """The last documents (about `fraction` of the text) are held out; a single document is cut in two."""
    if len(documents) == 1:
        text = documents[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - fraction))
        return [text[:cut]], [text[cut:].lstrip("\n")] if text[cut:].strip() else []
    total = sum(len(d) for d in documents)
    held, size = [], 0
    while documents and size < fraction * total and len(held) < len(documents) - 1:
        held.insert(0, documents[-1 - len(held)])
        size += len(held[0])
    return documents[: len(documents) - len(held)], held


def _prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Three prompts of different lengths (3, 7 and 12 tokens) cut from the held-out text."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text).ids
        if len(ids) >= 64:
            break
    if len(ids) < 24:
        ids = (ids + tokenizer.encode("The quick brown fox jumps over the lazy dog. Return the value.").ids) * 3
    return [ids[0:3], ids[3:10], ids[10:22]]


def build(opts: GeneratorOptions, version_dir: Path) -> dict[str, Any]:
    if opts.kv_cache == "shared_buffer" and "opt" in opts.variants:  # before any training
        raise ExportError("--kv-cache shared-buffer has no --optimize variant: its graph is written with the "
                          "fused operators already (int8 and fp16 are there)")
    torch.manual_seed(opts.seed)
    started = time.monotonic()
    figures: dict[str, Any] = {}
    val_docs: list[str] = []
    if opts.import_dir is not None:
        loaded = gen.load_checkpoint(opts.import_dir)
        if opts.corpus is not None:
            val_docs = gen.split_documents(opts.corpus)
    else:
        assert opts.corpus is not None
        documents = gen.split_documents(opts.corpus)
        if not documents:
            raise ExportError("the corpus is empty")
        train_docs, val_docs = split_corpus(documents, opts.val_fraction)
        t0 = time.monotonic()
        tokenizer = train_byte_bpe(train_docs, opts.vocab_size)
        figures["tokenizer_seconds"] = round(time.monotonic() - t0, 1)
        eos_id = tokenizer.token_to_id(EOS)
        # The model's vocabulary is as asked even when the corpus yields fewer merges (GPT-2-sized benchmarks
        # want 50257 logits); ids past the tokenizer's are never targets, so training drives them down.
        vocab = max(opts.vocab_size, tokenizer.get_vocab_size())
        model = gen.new_model(vocab_size=vocab, context=opts.context, layers=opts.layers, heads=opts.heads,
                              width=opts.width, eos_id=eos_id)
        stream = gen.encode_documents(tokenizer, train_docs, eos_id)
        logger.info("corpus: %d documents, %d training tokens, tokenizer vocabulary %d", len(documents), len(stream),
                    tokenizer.get_vocab_size())
        t0 = time.monotonic()
        loss = gen.train(model, stream, steps=opts.steps, batch_size=opts.batch_size, context=opts.context,
                         learning_rate=opts.learning_rate, seed=opts.seed)
        figures.update(train_steps=opts.steps, train_tokens=len(stream), train_loss=loss,
                       train_seconds=round(time.monotonic() - t0, 1))
        source = f"scratch (GPT-2, {opts.layers} layers, {opts.heads} heads, width {opts.width})"
        loaded = gen.LoadedGenerator(model.eval(), tokenizer, EOS, source)

    model, tokenizer = loaded.model, loaded.tokenizer
    config = model.config
    eos_id = tokenizer.token_to_id(loaded.eos) if loaded.eos else None
    eval_figures: dict[str, Any] = {}
    if val_docs:
        val_stream = gen.encode_documents(tokenizer, val_docs, eos_id)
        eval_figures = gen.evaluate(model, val_stream, context=config.n_positions)
        logger.info("validation loss %s, perplexity %s", eval_figures.get("val_loss"), eval_figures.get("perplexity"))

    version_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = version_dir / VARIANT_FILES["fp32"]
    shared = opts.kv_cache == "shared_buffer"
    t0 = time.monotonic()
    if shared:
        gpt2_shared_buffer.write_gpt2(model, fp32_path)
    else:
        export_generator(model, fp32_path)
    figures["export_seconds"] = round(time.monotonic() - t0, 1)

    pad_id = eos_id if eos_id is not None else 0
    prompts = _prompts(tokenizer, val_docs)
    new_tokens = max(1, min(opts.verify_tokens, config.n_positions - max(len(p) for p in prompts)))
    parity: dict[str, Any] = {}
    t0 = time.monotonic()
    tokenizer.save(str(version_dir / "tokenizer.json"))
    specials = special_ids(tokenizer, loaded.eos)
    # GPT-2 has one special token: it begins and ends documents, and pads (under attention_mask 0).
    specials["bos"] = specials["bos"] if specials["bos"] is not None else eos_id
    specials["pad"] = specials["pad"] if specials["pad"] is not None else eos_id
    architecture = {
        "model_type": "gpt2",
        "num_layers": config.n_layer,
        "num_heads": config.n_head,
        "head_size": config.n_embd // config.n_head,
        "hidden_size": config.n_embd,
        "vocab_size": config.vocab_size,
        "tokenizer_vocab_size": tokenizer.get_vocab_size(),
        "context_length": config.n_positions,
    }
    if shared:
        architecture["num_kv_heads"] = config.n_head
        input_names, output_names = gpt2_shared_buffer.graph_names(config.n_layer)
        onnx_section = {"opset": gpt2_shared_buffer.OPSET, "kv_cache": "shared_buffer", "inputs": input_names,
                        "outputs": output_names, "exporter": "nlpserve (GroupQueryAttention, export/gpt2_shared_buffer.py)"}
    else:
        input_names, output_names = generator_names(config.n_layer)
        onnx_section = {"opset": OPSET, "inputs": input_names, "outputs": output_names}
    repo_config: dict[str, Any] = {
        # format version 2 brought onnx.kv_cache: a version-1 reader would take this graph for the concat one
        "format_version": 2 if shared else FORMAT_VERSION,
        "name": opts.name,
        "version": opts.version,
        "kind": "generator",
        "labels": [],
        "max_sequence_length": config.n_positions,
        "pooling": None,
        "special_tokens": specials,
        "architecture": architecture,
        "onnx": {**onnx_section, "variants": {"fp32": fp32_path.name}},
        "batching": dict(GENERATOR_BATCHING),
        "generation": {"default_max_new_tokens": 64, "max_new_tokens": min(512, config.n_positions)},
    }
    if shared:  # verified through the server's own shared-buffer generator, as the Llama family is
        from export import build_llm

        served = build_llm.served_model(version_dir, repo_config, fp32_path.name)
        parity["fp32"] = build_llm.fp32_parity(model, served, {"batch1": prompts[2:], "batch3": prompts},
                                               new_tokens, "generator")
        logger.info("generator fp32 (shared buffer): max diff %.3g relative over %d greedy tokens (batch 1 and 3), "
                    "identical", parity["fp32"]["max_rel_diff"], new_tokens)
    for label, batch in (() if shared else (("batch1", prompts[2:]), ("batch3", prompts))):
        result = generator_parity(model, fp32_path, batch, new_tokens=new_tokens, pad_id=pad_id)
        if result["max_abs_diff"] > PARITY_BOUND or result["token_agreement"] < 1.0:
            raise VerificationError(
                f"generator fp32 ({label}): logits differ by {result['max_abs_diff']:.3g} (bound {PARITY_BOUND:g}), "
                f"greedy tokens agree on {result['token_agreement']:.1%} of {new_tokens} steps (all wanted)"
            )
        parity.setdefault("fp32", {"max_abs_diff": 0.0, "new_tokens": new_tokens, "token_identical": True})
        parity["fp32"]["max_abs_diff"] = max(parity["fp32"]["max_abs_diff"], result["max_abs_diff"])
        parity["fp32"][label] = {"max_abs_diff": result["max_abs_diff"]}
        logger.info("generator fp32 %s: max abs diff %.3g over %d greedy tokens, identical", label,
                    result["max_abs_diff"], new_tokens)
    figures["verify_seconds"] = round(time.monotonic() - t0, 1)

    files = {"fp32": fp32_path.name}
    if opts.variants:
        spec = variants.Spec(kind="generator", model_type="gpt2", num_heads=config.n_head, hidden_size=config.n_embd)
        for variant in opts.variants:
            path = version_dir / VARIANT_FILES[variant]
            facts = variants.produce(variant, spec, fp32_path, path, written_fused=shared)
            if shared:
                result = _shared_buffer_variant(variant, model, version_dir, repo_config, path.name, prompts,
                                                new_tokens, tokenizer, val_docs, eos_id, eval_figures)
                parity[variant] = {**result, **facts}
                files[variant] = path.name
                continue
            result = variants.verify_generator(variant, model, path, prompts, new_tokens, pad_id)
            result.update(facts)
            if val_docs:
                result["val_loss_delta"] = _onnx_val_loss_delta(path, tokenizer, val_docs, eos_id, config,
                                                                 eval_figures, result.get("providers"))
                variants.check_val_loss_delta(variant, result["val_loss_delta"], eval_figures.get("val_loss", 0.0))
            result.pop("providers", None)
            parity[variant] = result
            files[variant] = path.name

    repo_config["onnx"]["variants"] = files
    if shared:  # each variant's mixed-step graph (mixed_step.py), checked against the variant's own
        from export import build_llm

        mixed = build_llm.write_mixed_steps(version_dir, files, architecture)
        if mixed:
            repo_config["onnx"]["mixed_step"] = {variant: entry["file"] for variant, entry in mixed.items()}
        for variant, entry in mixed.items():
            parity[variant]["mixed_step_max_rel_diff"] = entry["max_rel_diff"]
    write_json(version_dir / "config.json", {
        **repo_config,
        "provenance": {
            **provenance(loaded.source, opts.corpus_description or "none", opts.command),
            **({"training": {k: figures[k] for k in ("train_steps", "train_tokens", "train_loss")}}
               if "train_steps" in figures else {}),
            **opts.extra_provenance,
        },
        "quality": {"parity": parity, "eval": eval_figures},
    })
    figures.update(parity=parity, eval=eval_figures, seconds=round(time.monotonic() - started, 1),
                   path=str(version_dir), vocab_size=config.vocab_size, tokenizer_vocab_size=tokenizer.get_vocab_size())
    return figures


def _shared_buffer_variant(
    variant: str, model: Any, version_dir: Path, config: dict[str, Any], filename: str, prompts: list[list[int]],
    new_tokens: int, tokenizer: Any, val_docs: list[str], eos_id: int | None, eval_figures: dict[str, Any],
) -> dict[str, Any]:
    """A variant of the shared-buffer graph, through the server's generator: the variant's parity bounds
    (variants.check_generator), and its loss on held-out text against PyTorch's (the 2% rule of
    check_val_loss_delta; one token a step, as the head sees the last position only)."""
    from export import build_llm

    try:
        served = build_llm.served_model(version_dir, config, filename)
    except Exception as exc:  # ONNX Runtime raises its own types for a graph it cannot load
        raise VerificationError(f"generator {variant}: the graph does not load: {str(exc).splitlines()[0][:300]}") from exc
    result = {**build_llm.parity(model, served, prompts, new_tokens), "provider": "CPUExecutionProvider"}
    figures = variants.check_generator(variant, result)
    if val_docs and "val_loss" in eval_figures:
        held_out = gen.encode_documents(tokenizer, val_docs, eos_id)[: min(128, config["max_sequence_length"])].tolist()
        if len(held_out) > 1:
            delta = math.log(build_llm.perplexity_onnx(served, held_out)) - math.log(
                build_llm.perplexity_torch(model, held_out))
            figures["val_loss_delta"] = round(delta, 4)
            figures["val_loss_tokens"] = len(held_out)
            variants.check_val_loss_delta(variant, delta, eval_figures["val_loss"])
    logger.info("generator %s (shared buffer): max diff %.3g, greedy agreement %.0f%%", variant,
                figures.get("max_rel_diff", figures["max_abs_diff"]), 100 * figures["token_agreement"])
    return figures


def _onnx_val_loss_delta(
    path: Path, tokenizer: Any, val_docs: list[str], eos_id: int | None, config: Any, eval_figures: dict[str, Any],
    providers: list[str] | None,
) -> float | None:
    """The variant's validation loss minus PyTorch's, over the same windows (prefill only, no past)."""
    from export.verify import session

    if "val_loss" not in eval_figures:
        return None
    stream = gen.encode_documents(tokenizer, val_docs, eos_id)
    length = min(config.n_positions, len(stream) - 1)
    count = min(64, max(1, 16384 // length), max(1, (len(stream) - 1) // length))  # the windows of evaluate()
    sess = session(path, providers)
    dtype = np.float16 if "float16" in next(i.type for i in sess.get_inputs() if i.name.startswith("past")) else np.float32
    head_size = config.n_embd // config.n_head
    losses = []
    for i in range(count):
        window = stream[i * length:i * length + length + 1]
        feed = {"input_ids": window[None, :-1], "attention_mask": np.ones((1, length), np.int64),
                "position_ids": np.arange(length, dtype=np.int64)[None], "logits_positions": np.arange(length, dtype=np.int64)}
        for layer in range(config.n_layer):
            for kind in ("key", "value"):
                feed[f"past_key_values.{layer}.{kind}"] = np.zeros((1, config.n_head, 0, head_size), dtype)
        logits = sess.run(["logits"], feed)[0][0].astype(np.float64)  # (T, V)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        losses.append(float(-logp[np.arange(length), window[1:]].mean()))
    return round(float(np.mean(losses)) - eval_figures["val_loss"], 4)
