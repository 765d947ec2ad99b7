"""The in-process baselines, no server in between: the ONNX Runtime classification loop (tokenize, run,
softmax), the ONNX Runtime KV-cache decode loop, the plain PyTorch loop that recomputes the whole sequence
for every new token, and onnxruntime-genai's own generator loop (Llama-family builder exports). They read the
same model repository the server serves."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import latency_summary

logger = logging.getLogger(__name__)

clock = time.perf_counter


@dataclass(frozen=True)
class ModelFiles:
    """One version of one model in a model repository."""

    name: str
    folder: Path
    config: dict[str, Any]

    @classmethod
    def find(cls, repository: Path, name: str) -> ModelFiles:
        """The highest version of `name` in `repository` (the one the server serves)."""
        versions = [p for p in (repository / name).iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            raise FileNotFoundError(f"{repository / name}: no version folder")
        folder = max(versions, key=lambda p: int(p.name))
        return cls(name=name, folder=folder, config=json.loads((folder / "config.json").read_text()))

    def onnx_path(self, variant: str) -> Path:
        files = self.config["onnx"]["variants"]
        if variant not in files:
            logger.warning("%s has no %s variant; using fp32", self.name, variant)
            variant = "fp32"
        return self.folder / files[variant]

    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    def summary(self) -> dict[str, Any]:
        """What the results say about the model: its shape, where it came from, its size on disk."""
        arch = self.config.get("architecture", {})
        return {
            "name": self.name,
            "kind": self.kind,
            "model_type": arch.get("model_type"),
            "num_layers": arch.get("num_layers"),
            "hidden_size": arch.get("hidden_size"),
            "num_heads": arch.get("num_heads"),
            "vocab_size": arch.get("vocab_size"),
            "max_sequence_length": self.config.get("max_sequence_length"),
            "fp32_megabytes": round(self.onnx_path("fp32").stat().st_size / 2**20, 1),
            "source": self.config.get("provenance", {}).get("source"),
        }


def spins(generator: bool) -> bool:
    """Whether the server's default `--intra-op-spinning` lets this kind of session's threads spin."""
    from server.config import Settings

    return Settings.__dataclass_fields__["intra_op_spinning"].default.spins(generator)


def ort_session(path: Path, threads: int, device: str = "cpu", generator: bool = False) -> Any:
    """An ONNX Runtime session set up as the server sets up its own (server/runtime.py): the same intra-op threads,
    spinning as the server's default does it (`--intra-op-spinning`), all graph
    optimizations, the CUDA provider first when asked for. The comparison measures what the server adds around
    the same runtime, not a difference of settings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spins(generator) else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError("the CUDA provider is not active (ONNX Runtime fell back to the CPU)")
    return session


def _tokenizer(model: ModelFiles) -> Any:
    """The model's tokenizer, without the padding or truncation a tokenizer.json may carry (each caller sets its
    own: a prompt padded to 128 tokens would measure another workload)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model.folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# ---------------------------------------------------------------------------------------------- classifier


class Classifier:
    """Tokenize, run, softmax: what a user's own loop around ONNX Runtime does."""

    def __init__(self, model: ModelFiles, variant: str = "fp32", threads: int = 0, device: str = "cpu") -> None:
        self.model = model
        self.session = ort_session(model.onnx_path(variant), threads, device)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = _tokenizer(model)
        pad = model.config["special_tokens"].get("pad") or 0
        self.tokenizer.enable_truncation(max_length=int(model.config["max_sequence_length"]))
        self.tokenizer.enable_padding(pad_id=pad, pad_token=self.tokenizer.id_to_token(pad) or "[PAD]")

    def output(self, name: str, texts: Sequence[str]) -> np.ndarray:
        """The graph's output `name` for a padded batch of `texts`."""
        encodings = self.tokenizer.encode_batch(list(texts))
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        (values,) = self.session.run([name], {k: v for k, v in feeds.items() if k in self.inputs})
        return values

    def length_sorted_batches(self, texts: Sequence[str], batch_size: int) -> list[list[str]]:
        """`texts` sorted by token count (the mask counts the real tokens of a padded batch), cut into batches: the
        least padding, what a loop that sees all the texts first can do."""
        lengths = [sum(e.attention_mask) for e in self.tokenizer.encode_batch(list(texts))]
        ordered = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
        return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        logits = self.output("logits", texts)
        logits = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        return probabilities / probabilities.sum(axis=1, keepdims=True)


def measure_classifier(
    classifier: Classifier, texts: Sequence[str], batch_size: int, duration_s: float, min_sequences: int = 0
) -> dict[str, Any]:
    """Sequences per second of the loop at `batch_size`, on successive slices of `texts` (a short warm-up first)."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts) - batch_size + 1, batch_size)]
    for batch in batches[:2]:
        classifier(batch)
    seconds: list[float] = []
    done = 0
    start = clock()
    k = 0
    while clock() - start < duration_s or done < min_sequences:
        batch = batches[k % len(batches)]
        k += 1
        t0 = clock()
        classifier(batch)
        seconds.append(clock() - t0)
        done += len(batch)
    elapsed = clock() - start
    return {
        "batch_size": batch_size,
        "window_s": round(elapsed, 3),
        "sequences": done,
        "sequences_per_s": round(done / elapsed, 2),
        "batch_latency_ms": latency_summary(seconds),
        "load_average": round(os.getloadavg()[0], 2),
    }


# --------------------------------------------------------------------------------------------- generator


class Decoder:
    """A batch decoded together with ONNX Runtime and the KV cache, greedily: prefill the (left-padded) prompts
    in one run, then one run per new token that feeds the previous run's present key/values back as the past."""

    def __init__(self, model: ModelFiles, variant: str = "fp32", threads: int = 0, device: str = "cpu") -> None:
        self.model = model
        self.session = ort_session(model.onnx_path(variant), threads, device, generator=True)
        self.tokenizer = _tokenizer(model)
        arch = model.config["architecture"]
        self.layers = int(arch["num_layers"])
        self.heads = int(arch["num_heads"])
        self.head_size = int(arch["head_size"])
        self.context = int(model.config["max_sequence_length"])
        past_type = next(i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values"))
        self.dtype = np.float16 if "float16" in past_type else np.float32
        self.pad = model.config["special_tokens"].get("pad") or 0
        self.outputs = [o.name for o in self.session.get_outputs()]
        # as the server does: the last position's logits only, where the graph takes `logits_positions`
        self.last_only = any(i.name == "logits_positions" for i in self.session.get_inputs())

    def fitting(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """The prompts that leave room for `max_new_tokens` in the context (the server refuses the others), each
        cut to its first words if none would fit."""
        room = self.context - max_new_tokens - 1  # one spare token: a server may prepend BOS
        fit = [p for p in prompts if len(self.tokenizer.encode(p).ids) <= room]
        if not fit:
            fit = [" ".join(p.split()[:8]) for p in prompts]
            fit = [p for p in fit if len(self.tokenizer.encode(p).ids) <= room]
        if not fit:
            raise ValueError(f"{self.model.name}: no prompt fits its context with {max_new_tokens} new tokens")
        return fit

    def encode(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        keep = self.context - max_new_tokens
        return [self.tokenizer.encode(p).ids[-keep:] or [self.pad] for p in prompts]

    def __call__(self, prompts: Sequence[list[int]], max_new_tokens: int) -> tuple[float, float]:
        """Decodes `max_new_tokens` for every prompt; returns (seconds to the first token, seconds in all)."""
        t0 = clock()
        batch, longest = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, longest), self.pad, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p) :] = p
            mask[row, longest - len(p) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((batch, self.heads, 0, self.head_size), dtype=self.dtype)
        past = {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}
        first = 0.0
        for step in range(max_new_tokens):
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
            if self.last_only:
                feed["logits_positions"] = np.array([ids.shape[1] - 1], dtype=np.int64)
            out = dict(zip(self.outputs, self.session.run(None, feed)))
            next_ids = out["logits"][:, -1, :].argmax(axis=-1)
            if step == 0:
                first = clock() - t0
            ids = next_ids[:, None].astype(np.int64)
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            past = {
                f"past_key_values.{i}.{kv}": out[f"present.{i}.{kv}"]
                for i in range(self.layers)
                for kv in ("key", "value")
            }
        return first, clock() - t0


class SlotDecoder(Decoder):
    """The same loop for a shared-buffer graph (`onnx.kv_cache: "shared_buffer"`), through the server's own
    generator class on the slot cache (server/generation/model.py), without its scheduler: each prompt prefilled
    into its slot, then one decode step over all the rows per token, greedy."""

    def __init__(self, model: ModelFiles, variant: str = "fp32", threads: int = 0, device: str = "cpu") -> None:
        from server.config import Device
        from server.generation.model import SharedBufferGenerator
        from server.repository import ModelConfig
        from server.runtime import Session

        self.model = model
        self.tokenizer = _tokenizer(model)
        self.context = int(model.config["max_sequence_length"])
        self.pad = model.config["special_tokens"].get("pad") or 0
        self.slots = 64  # the most streams a plan measures
        session = Session(model.onnx_path(variant), Device(device), threads, spinning=spins(True))
        self.generator = SharedBufferGenerator(ModelConfig.read(model.folder), session, self.slots)

    def __call__(self, prompts: Sequence[list[int]], max_new_tokens: int) -> tuple[float, float]:
        t0 = clock()
        logits, cache = self.generator.prefill(prompts)
        first = 0.0
        try:
            for step in range(max_new_tokens):
                # on a GPU the step's logits stay there: the sampling head's top 1 is the argmax
                next_ids = logits.argmax(axis=-1) if isinstance(logits, np.ndarray) else logits.top(1)[1][:, 0]
                if step == 0:
                    first = clock() - t0
                if step + 1 < max_new_tokens:
                    logits, cache = self.generator.decode(next_ids.tolist(), [0] * len(prompts), cache)
        finally:
            cache.release()
        return first, clock() - t0


def make_decoder(model: ModelFiles, variant: str = "fp32", threads: int = 0, device: str = "cpu") -> Decoder:
    """The in-process decode loop for the model's KV-cache contract."""
    shared = model.config.get("onnx", {}).get("kv_cache") == "shared_buffer"
    return (SlotDecoder if shared else Decoder)(model, variant, threads, device)


def _repeat(
    generate: Callable[[Any, int], tuple[float, float]], inputs: Sequence[Any], max_new_tokens: int, duration_s: float
) -> tuple[list[float], list[float]]:
    """Runs `generate(input, max_new_tokens)` over `inputs`, round-robin, for `duration_s` (at least once);
    returns the (time to first token, total time) of each run."""
    firsts: list[float] = []
    totals: list[float] = []
    start = clock()
    k = 0
    while not totals or clock() - start < duration_s:
        first, total = generate(inputs[k % len(inputs)], max_new_tokens)
        k += 1
        firsts.append(first)
        totals.append(total)
    return firsts, totals


def measure_decoder(
    decoder: Decoder, prompts: Sequence[str], batch_size: int, max_new_tokens: int, duration_s: float
) -> dict[str, Any]:
    """Aggregate tokens/s of the decode loop at `batch_size` (successive batches of `prompts`, at least one after
    a one-token warm-up), with its time to the first token (the prefill)."""
    encoded = decoder.encode(prompts, max_new_tokens)
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded) - batch_size + 1, batch_size)]
    decoder(batches[0], 1)
    firsts, totals = _repeat(decoder, batches, max_new_tokens, duration_s)
    tokens = batch_size * max_new_tokens * len(totals)
    return {
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "runs": len(totals),
        "window_s": round(sum(totals), 3),
        "tokens_per_s": round(tokens / sum(totals), 2),
        "per_stream_tokens_per_s": round(max_new_tokens * len(totals) / sum(totals), 2),
        "ttft_ms": latency_summary(firsts),
        "load_average": round(os.getloadavg()[0], 2),
    }


class TorchNoCache:
    """The loop users start from: a PyTorch GPT-2 that recomputes the whole sequence for every new token (no KV
    cache), one request at a time. Same architecture as the served model; random weights (speed does not depend
    on them), greedy."""

    def __init__(self, model: ModelFiles, threads: int = 0) -> None:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        arch = model.config["architecture"]
        if arch.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{model.name}: the PyTorch baseline knows GPT-2 only, not {arch['model_type']}")
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=int(arch["vocab_size"]),
            n_positions=int(arch["context_length"]),
            n_embd=int(arch["hidden_size"]),
            n_layer=int(arch["num_layers"]),
            n_head=int(arch["num_heads"]),
            # the repository's own special ids: GPT2Config's defaults (50256) lie outside small vocabularies
            bos_token_id=model.config["special_tokens"].get("bos"),
            eos_token_id=model.config["special_tokens"].get("eos"),
        )
        self.torch = torch
        self.net = GPT2LMHeadModel(config).eval()
        self.parameters = sum(p.numel() for p in self.net.parameters())
        self.tokenizer = _tokenizer(model)
        self.context = int(model.config["max_sequence_length"])

    def __call__(self, prompt: list[int], max_new_tokens: int) -> tuple[float, float]:
        torch = self.torch
        t0 = clock()
        first = 0.0
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            for step in range(max_new_tokens):
                logits = self.net(input_ids=ids, use_cache=False).logits[:, -1, :]
                ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
                if step == 0:
                    first = clock() - t0
        return first, clock() - t0


def measure_torch_no_cache(
    baseline: TorchNoCache, prompts: Sequence[str], max_new_tokens: int, duration_s: float
) -> dict[str, Any]:
    """Tokens/s of the no-cache loop serving requests one at a time (at least one request after a warm-up)."""
    keep = baseline.context - max_new_tokens
    encoded = [baseline.tokenizer.encode(p).ids[-keep:] or [0] for p in prompts]
    baseline(encoded[0], 2)
    firsts, totals = _repeat(baseline, encoded, max_new_tokens, duration_s)
    return {
        "batch_size": 1,
        "max_new_tokens": max_new_tokens,
        "runs": len(totals),
        "parameters": baseline.parameters,
        "window_s": round(sum(totals), 3),
        "tokens_per_s": round(max_new_tokens * len(totals) / sum(totals), 2),
        "ttft_ms": latency_summary(firsts),
        "load_average": round(os.getloadavg()[0], 2),
    }


# ----------------------------------------------------------------------------------- onnxruntime-genai


def genai_folder(model: ModelFiles, variant: str, threads: int, work: Path) -> Path:
    """A folder onnxruntime-genai can load for `variant` of `model`: links to the version folder's files and a
    genai_config.json that names the variant's file (the exported one names the fp32 file) and sets the
    session as the server sets its own (server/runtime.py): the same intra-op threads, spinning as for the
    server's generators, all graph optimizations. Its search settings are left as exported; the loop sets what
    it needs."""
    source = model.folder / "genai_config.json"
    if not source.is_file():
        raise FileNotFoundError(f"{model.folder}: no genai_config.json (not an onnxruntime-genai builder export)")
    folder = work / f"genai-{model.name}-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in model.folder.iterdir():
        link = folder / path.name
        if path.name != "genai_config.json" and not link.exists():
            link.symlink_to(path.resolve())
    config = json.loads(source.read_text())
    decoder = config["model"]["decoder"]
    decoder["filename"] = model.onnx_path(variant).name
    options = decoder.setdefault("session_options", {})
    if threads:
        options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    options["graph_optimization_level"] = "ORT_ENABLE_ALL"
    # a key onnxruntime-genai does not know is passed to the session as a config entry
    options["session.intra_op.allow_spinning"] = "1" if spins(generator=True) else "0"
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


class GenaiLoop:
    """onnxruntime-genai's own generator loop on a model folder: `og.Model`, then per batch `GeneratorParams`
    (greedy, `batch_size`, `max_length` = prompt + new tokens), `og.Generator`, `append_tokens` (the prefill) and
    `generate_next_token` with `get_next_tokens` until done: what its examples do.

    A batch's prompts must have one length: onnxruntime-genai 0.18 on the CPU computes a padded row of a
    GroupQueryAttention model wrongly (left or right padding: its logits differ from those of the same prompt
    alone), so a static batch is only exact without padding."""

    def __init__(self, folder: Path, eos_ids: Sequence[int]) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.folder = folder
        self.model = og.Model(str(folder))
        self.eos_ids = np.array(sorted(eos_ids), dtype=np.int64)

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[float, float, int]:
        """Generates up to `max_new_tokens` for every prompt; returns (seconds to the first token, seconds in all,
        tokens generated: each row's up to and including its end-of-sequence token, as the server counts)."""
        length = len(prompts[0])
        if any(len(p) != length for p in prompts):
            raise ValueError("onnxruntime-genai static batch: prompts of different lengths (padding is not exact)")
        og = self.og
        t0 = clock()
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, batch_size=len(prompts), max_length=length + max_new_tokens)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))
        first = 0.0
        running = np.ones(len(prompts), dtype=bool)
        tokens = 0
        for step in range(max_new_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
            new = np.asarray(generator.get_next_tokens())
            if step == 0:
                first = clock() - t0
            tokens += int(running.sum())
            running &= ~np.isin(new, self.eos_ids)
        return first, clock() - t0, tokens


def measure_genai(
    loop: GenaiLoop, prompts: Sequence[Sequence[int]], batch_size: int, max_new_tokens: int, duration_s: float
) -> dict[str, Any]:
    """Aggregate tokens/s of the onnxruntime-genai loop at a static `batch_size` (successive batches of
    `prompts`, for `duration_s` and at least once, after a two-token warm-up): generated tokens over the wall
    time of the runs, prefill included; time to the first token is the batch's."""
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"{len(prompts)} prompts: not enough for a batch of {batch_size}")
    loop(batches[0], 2)
    firsts: list[float] = []
    totals: list[float] = []
    tokens = 0
    start = clock()
    k = 0
    while not totals or clock() - start < duration_s:
        first, total, generated = loop(batches[k % len(batches)], max_new_tokens)
        k += 1
        firsts.append(first)
        totals.append(total)
        tokens += generated
    runs = len(totals)
    return {
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "runs": runs,
        "window_s": round(sum(totals), 3),
        "tokens_per_s": round(tokens / sum(totals), 2),
        "per_stream_tokens_per_s": round(tokens / batch_size / sum(totals), 2),
        "mean_generated_tokens": round(tokens / (runs * batch_size), 2),
        "ttft_ms": latency_summary(firsts),
        "load_average": round(os.getloadavg()[0], 2),
    }
