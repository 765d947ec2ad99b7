"""Long prompts arriving while streams decode: `python -m bench longprompt [--quick]`. Servers on the same
Llama-family model (default `smollm2`, the demo's; shared-buffer decoders only), with chunked prefill
(`--prefill-chunk-tokens`: one server per chunk size of the plan, 128 and 512) and one without (`0`: each prompt
prefilled whole), in rotating rounds:

- 16 closed-loop chat streams (the project's AsyncClient), greedy, 64 new tokens each: their inter-token latency
  (p50, p99, max) over a fixed window is the figure;
- meanwhile one client sends prompts of about 1,800 tokens one after another (a new one as soon as the previous
  one's first token came), each asking for 4 new tokens: its time to first token is recorded too.

Without chunking, every long prompt's prefill runs between two decode steps: every stream waits for it. With
chunking, a step carries at most one chunk of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench import inprocess, load
from bench.data import load_texts
from bench.llm import DEFAULT_REPOSITORY
from bench.stats import latency_summary

logger = logging.getLogger(__name__)

clock = time.perf_counter
NOTE = (
    "Long prompts: servers on the same model, chunked prefill (--prefill-chunk-tokens, one server per size) and not "
    "(0), rotating rounds; 16 chat streams (AsyncClient, greedy) and one client sending long prompts back to back, all in the "
    "bench process, on the same CPUs as the servers."
)


@dataclass(frozen=True)
class LongPromptPlan:
    """How much to measure. LONG_QUICK: about a minute on 2 cores; LONG_FULL about 6."""

    name: str
    rounds: int
    streams: int
    max_new_tokens: int
    long_tokens: int  # the long prompts' length, in the model's tokens
    long_new_tokens: int
    window: load.Window
    chunk_tokens: tuple[int, ...]  # one chunked server per size, against one prefilling whole


LONG_QUICK = LongPromptPlan(name="longprompt-quick", rounds=1, streams=4, max_new_tokens=16, long_tokens=256,
                            long_new_tokens=2, window=load.Window(1.0, 6.0, 0, 6.0), chunk_tokens=(64,))
LONG_FULL = LongPromptPlan(name="longprompt-full", rounds=3, streams=16, max_new_tokens=64, long_tokens=1800,
                           long_new_tokens=4, window=load.Window(3.0, 30.0, 0, 30.0), chunk_tokens=(128, 512))


def long_prompts(model: inprocess.ModelFiles, tokens: int, count: int = 4) -> list[str]:
    """`count` different texts of about `tokens` tokens each, made of sentences (SST-2's when at hand)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model.folder / "tokenizer.json"))
    sentences = load_texts(None).sentences
    out = []
    for k in range(count):
        words: list[str] = []
        i = k * 97
        while len(tokenizer.encode(" ".join(words)).ids) < tokens:
            words.extend(sentences[i % len(sentences)].split())
            i += 1
        ids = tokenizer.encode(" ".join(words)).ids[:tokens]
        out.append(tokenizer.decode(ids))
    return out


async def long_prompt_client(target: str, model: str, prompts: list[str], max_new_tokens: int,
                             ttft: list[float], stop: asyncio.Event) -> None:
    """Sends the long prompts one after another until `stop`; records each one's time to first token."""
    from client import AsyncClient

    async with AsyncClient(target) as api:
        k = 0
        while not stop.is_set():
            sent = clock()
            first = None
            async for chunk in api.generate_stream(prompts[k % len(prompts)], model=model,
                                                   max_new_tokens=max_new_tokens, temperature=0.0):
                if first is None and chunk.token_ids:
                    first = clock() - sent
            if first is not None:
                ttft.append(first)
            k += 1


async def point(srv: Any, model: str, conversations: list[Any], prompts: list[str], plan: LongPromptPlan) -> dict:
    ttft: list[float] = []
    stop = asyncio.Event()
    background = asyncio.create_task(long_prompt_client(srv.target, model, prompts, plan.long_new_tokens, ttft, stop))
    try:
        streams = await load.chat_closed_loop(srv.target, model, conversations, plan.streams, plan.max_new_tokens,
                                              plan.window, 0.0, srv.metrics_url, int(srv.pid))
    finally:
        stop.set()
        await asyncio.wait_for(background, timeout=120)
    return {"streams": streams, "long_prompts": {"count": len(ttft), "ttft_ms": latency_summary(ttft)},
            "load_average": round(os.getloadavg()[0], 2)}


def bench_long_prompts(repository: Path, model_name: str, plan: LongPromptPlan, threads: int, variant: str,
                       work: Path) -> dict[str, Any]:
    from bench.llm import chat_prompts
    from bench.suite import compare, median_point, single_model_repository
    from server.process import ServerProcess

    model = inprocess.ModelFiles.find(repository, model_name)
    if model.config.get("onnx", {}).get("kv_cache") != "shared_buffer":
        raise ValueError(f"{model_name}: chunked prefill needs a shared-buffer decoder (onnx.kv_cache)")
    conversations = chat_prompts(model, 1).conversations
    prompts = long_prompts(model, plan.long_tokens)
    single = single_model_repository(repository, model_name, work)
    configs = {**{f"chunk {n}": str(n) for n in plan.chunk_tokens}, "whole": "0"}
    runner = asyncio.Runner()
    rounds: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    try:
        for label, chunk in configs.items():
            servers[label] = ServerProcess(single, args=[
                "--device", "cpu", "--variant", variant, "--intra-op-threads", str(threads), "--http-port", "-1",
                "--max-active-sequences", str(plan.streams + 1), "--prefill-chunk-tokens", chunk,
                "--log-level", "WARNING"], startup_timeout=300.0).start()
        for r in range(plan.rounds):
            order = list(configs)[r % len(configs):] + list(configs)[: r % len(configs)]
            entry = {}
            for label in order:
                entry[label] = runner.run(point(servers[label], model_name, conversations, prompts, plan))
                s = entry[label]["streams"]
                logger.info("longprompt: round %d, %s: streams %.1f tok/s, ITL p50 %.0f p99 %.0f max %.0f ms; %d long "
                            "prompts, TTFT p50 %.0f ms", r + 1, label, s["tokens_per_s"], s["itl_ms"]["p50"],
                            s["itl_ms"]["p99"], s["itl_ms"]["max"], entry[label]["long_prompts"]["count"],
                            entry[label]["long_prompts"]["ttft_ms"]["p50"] or 0)
            rounds.append(entry)
    finally:
        for srv in servers.values():
            srv.stop()
        runner.close()
    ctx = SimpleNamespace(comparisons=[])
    for label in configs:
        if label == "whole":
            continue
        size = label.split()[1]
        for metric in ("p99", "max"):
            compare(
                ctx, id=f"longprompt/chunk{size}/itl-{metric}", group="long prompts",  # type: ignore[arg-type]
                model=f"{model_name} {variant}", metric=f"ITL {metric} ms", higher_is_better=False,
                title=(f"{plan.streams} streams' inter-token latency {metric} while {plan.long_tokens}-token prompts "
                       f"arrive: prefill in chunks of {size} / whole"),
                a=label, b="whole", a_values=[r[label]["streams"]["itl_ms"][metric] for r in rounds],
                b_values=[r["whole"]["streams"]["itl_ms"][metric] for r in rounds],
            )
        compare(
            ctx, id=f"longprompt/chunk{size}/tokens", group="long prompts",  # type: ignore[arg-type]
            model=f"{model_name} {variant}", metric="tokens/s",
            title=f"the streams' tokens/s meanwhile: chunks of {size} / whole", a=label, b="whole",
            a_values=[r[label]["streams"]["tokens_per_s"] for r in rounds],
            b_values=[r["whole"]["streams"]["tokens_per_s"] for r in rounds],
        )
        compare(
            ctx, id=f"longprompt/chunk{size}/long-ttft", group="long prompts",  # type: ignore[arg-type]
            model=f"{model_name} {variant}", metric="TTFT p50 ms", higher_is_better=False,
            title=f"the long prompts' time to first token: chunks of {size} / whole", a=label, b="whole",
            a_values=[r[label]["long_prompts"]["ttft_ms"]["p50"] or float("nan") for r in rounds],
            b_values=[r["whole"]["long_prompts"]["ttft_ms"]["p50"] or float("nan") for r in rounds],
        )
    return {"model": model.summary(), "variant": variant, "rounds": rounds,
            "points": {label: median_point([r[label] for r in rounds]) for label in configs},
            "chunk_tokens": list(plan.chunk_tokens), "long_tokens": plan.long_tokens, "comparisons": ctx.comparisons}


def run(args: Any, info: dict[str, Any]) -> dict[str, Any]:
    """`python -m bench longprompt`: the figures under `results["longprompt"]`, and the comparisons."""
    import tempfile

    from bench.suite import plan_of

    plan = plan_of(args, LONG_QUICK, LONG_FULL, "longprompt")
    repository = args.models or DEFAULT_REPOSITORY
    threads = args.threads or info["cpus_usable"]
    work = Path(tempfile.mkdtemp(prefix="nlpserve-bench-longprompt-"))
    figures = bench_long_prompts(repository, args.llm_model, plan, threads, args.variant, work)
    figures["repository"] = str(repository)
    comparisons = figures.pop("comparisons")
    return {"plan": asdict(plan), "longprompt": figures, "comparisons": comparisons,
            "settings": {"device": "cpu", "variant": args.variant, "intra_op_threads": threads},
            "texts": f"chat prompts of the llm plan; long prompts of {plan.long_tokens} tokens from sentences",
            "notes": [NOTE]}


def markdown(results: dict[str, Any]) -> str:
    from bench import report
    from bench.report import _table

    lp = results["longprompt"]
    lines = [report.markdown(results).rstrip("\n"), "",
             (f"## Long prompts: {lp['model']['name']} {lp['variant']}, {lp['long_tokens']}-token prompts, chunks of "
              f"{', '.join(map(str, lp['chunk_tokens']))} against whole prompts"), "", "Medians of the rounds:", ""]
    lines += _table(["server", "streams tokens/s", "ITL p50 ms", "ITL p99 ms", "ITL max ms", "long prompts",
                     "long TTFT p50 ms", "load average"],
                    [[label, p["streams"]["tokens_per_s"], p["streams"]["itl_ms"]["p50"], p["streams"]["itl_ms"]["p99"],
                      p["streams"]["itl_ms"]["max"], p["long_prompts"]["count"], p["long_prompts"]["ttft_ms"]["p50"],
                      p["load_average"]] for label, p in lp["points"].items()])
    return "\n".join(lines)


def summary_lines(lp: dict[str, Any]) -> list[str]:
    return [f"longprompt: {label}: ITL p99 {p['streams']['itl_ms']['p99']} ms, max {p['streams']['itl_ms']['max']} ms, "
            f"{p['streams']['tokens_per_s']} tokens/s" for label, p in lp["points"].items()]
