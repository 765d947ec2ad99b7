"""The OpenAI-compatible HTTP front against nlpserve.v1 on the same generator: `python -m bench openai [--quick]`.

One server (the real `python -m server`, its gRPC and HTTP ports), the Llama-family model (default `smollm2`; the
demo's `docgpt` when the repository has no such model), the same conversations, greedy, the same number of new
tokens, on both fronts in one run, in alternating rounds:

- nlpserve.v1: the project's `AsyncClient.chat_stream` over gRPC;
- OpenAI: the `openai` SDK's `AsyncOpenAI().chat.completions.create(stream=True)`, server-sent events over HTTP/1.1
  (with `stream_options.include_usage`, so that the server's token count comes back).

Each pass sends the same fixed set of requests through `streams` closed-loop clients (default 16); tokens/s is
the tokens generated (the server's counts) over the pass's wall time, so both sides do exactly the same work.
Then aiperf (NVIDIA's load tool for OpenAI endpoints, in a venv of its own, .cache/aiperf-venv, made on first
use) drives the OpenAI front at the same concurrency on its own synthetic prompts, and its figures are recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench import inprocess, models
from bench.machine import ROOT
from bench.stats import latency_summary

logger = logging.getLogger(__name__)

clock = time.perf_counter

AIPERF_VENV = ROOT / ".cache" / "aiperf-venv"
AIPERF_PINS = ("aiperf==0.13.0",)
NOTE = (
    "OpenAI front against nlpserve.v1: one server, both fronts sent the same conversations (greedy, the same "
    "max tokens) by Python asyncio clients in the bench process (the openai SDK; the project's AsyncClient), "
    "through a fixed set of requests per pass; tokens/s = generated tokens (the server's counts) / the pass's wall "
    "time. The load generator runs on the same CPUs as the server."
)


@dataclass(frozen=True)
class FrontsPlan:
    """How much to measure. OPENAI_QUICK takes about a minute on 2 cores with docgpt; OPENAI_FULL about 6
    minutes with smollm2 (aiperf's venv made)."""

    name: str
    rounds: int
    streams: int
    requests: int  # per pass, through `streams` closed-loop clients
    max_tokens: int
    aiperf_requests: int  # 0: aiperf not run


OPENAI_QUICK = FrontsPlan(name="openai-quick", rounds=2, streams=16, requests=32, max_tokens=16, aiperf_requests=0)
OPENAI_FULL = FrontsPlan(name="openai-full", rounds=3, streams=16, requests=96, max_tokens=64, aiperf_requests=96)


# -------------------------------------------------------------------------------------------------- passes


@dataclass
class _Call:
    sent: float
    arrivals: list[float]
    tokens: int = 0
    done: float = 0.0
    error: str | None = None


async def _pass(call: Callable[[int, _Call], Awaitable[None]], requests: int, streams: int) -> dict[str, Any]:
    """`requests` calls through `streams` closed-loop clients; tokens/s over the pass's wall time."""
    records: list[_Call] = []
    queue = iter(range(requests))

    async def client() -> None:
        for k in queue:
            record = _Call(sent=clock(), arrivals=[])
            records.append(record)
            try:
                await call(k, record)
            except Exception as e:  # noqa: BLE001 - counted, shown in the results
                record.error = f"{type(e).__name__}: {e}"[:200]
            record.done = clock()

    start = clock()
    await asyncio.gather(*(client() for _ in range(streams)))
    seconds = clock() - start
    ok = [r for r in records if r.error is None]
    itl = [b - a for r in ok for a, b in zip(r.arrivals, r.arrivals[1:])]
    errors = sorted({r.error for r in records if r.error})
    return {
        "streams": streams,
        "requests": requests,
        "ok": len(ok),
        "errors": errors[:5],
        "tokens": sum(r.tokens for r in ok),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(sum(r.tokens for r in ok) / seconds, 2),
        "ttft_ms": latency_summary([r.arrivals[0] - r.sent for r in ok if r.arrivals]),
        "inter_chunk_ms": latency_summary(itl),
        "load_average": round(os.getloadavg()[0], 2),
    }


async def nlpserve_pass(target: str, model: str, inputs: Sequence[Any], streams: int, requests: int,
                        max_tokens: int) -> dict[str, Any]:
    """GenerateStream through `AsyncClient`: `chat_stream` for conversations, `generate_stream` for prompts."""
    from client import AsyncClient

    async with AsyncClient(target) as api:
        await api.health()

        async def call(k: int, record: _Call) -> None:
            given = inputs[k % len(inputs)]
            if isinstance(given, str):
                chunks = api.generate_stream(given, model=model, max_new_tokens=max_tokens, temperature=0.0)
            else:
                chunks = api.chat_stream(given, model=model, max_new_tokens=max_tokens, temperature=0.0)
            async for chunk in chunks:
                if chunk.token_ids:
                    record.arrivals.append(clock())
                    record.tokens += len(chunk.token_ids)

        return await _pass(call, requests, streams)


async def openai_pass(base_url: str, model: str, inputs: Sequence[Any], streams: int, requests: int,
                      max_tokens: int) -> dict[str, Any]:
    """The openai SDK, streaming: /v1/chat/completions for conversations, /v1/completions for prompts."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600.0) as api:

        async def call(k: int, record: _Call) -> None:
            given = inputs[k % len(inputs)]
            common: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                                      "stream_options": {"include_usage": True}}
            if isinstance(given, str):
                stream = await api.completions.create(prompt=given, **common)
            else:
                stream = await api.chat.completions.create(messages=given, **common)
            async for chunk in stream:
                choice = chunk.choices[0] if chunk.choices else None
                if choice is not None and (choice.text if isinstance(given, str) else choice.delta.content):
                    record.arrivals.append(clock())
                if chunk.usage is not None:
                    record.tokens = chunk.usage.completion_tokens

        return await _pass(call, requests, streams)


# ------------------------------------------------------------------------------------------------- aiperf


def aiperf_venv() -> Path:
    """.cache/aiperf-venv with aiperf pinned, made (or completed) when it lacks it."""
    binary = AIPERF_VENV / "bin" / "aiperf"
    python = AIPERF_VENV / "bin" / "python"
    check = "import importlib.metadata as m, sys; sys.exit(m.version('aiperf') != sys.argv[1])"
    version = AIPERF_PINS[0].split("==")[1]
    if binary.exists() and subprocess.run([str(python), "-c", check, version], capture_output=True,
                                          check=False).returncode == 0:
        return binary
    logger.info("making %s (%s): about 1.2 GB from PyPI", AIPERF_VENV, " ".join(AIPERF_PINS))
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AIPERF_VENV)], check=True)
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             *AIPERF_PINS], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cannot make {AIPERF_VENV}: {result.stderr.strip().splitlines()[-1:]}")
    return binary


def run_aiperf(binary: Path, base_url: str, model: inprocess.ModelFiles, plan: FrontsPlan, work: Path,
               prompt_tokens: int, endpoint: str) -> dict[str, Any]:
    """aiperf against the OpenAI front's `endpoint` (chat or completions), streaming, at the plan's concurrency; its summary
    (profile_export_aiperf.json) reduced to the figures the results keep. Its tokenizer is the model's own folder
    (nothing is downloaded)."""
    out = work / "aiperf"
    command = [
        str(binary), "profile", "--model", model.name, "--url", base_url, "--endpoint-type", endpoint, "--streaming",
        "--tokenizer", str(model.folder), "--concurrency", str(plan.streams),
        "--request-count", str(plan.aiperf_requests), "--warmup-request-count", str(plan.streams),
        "--prompt-input-tokens-mean", str(prompt_tokens), "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(plan.max_tokens), "--prompt-output-tokens-stddev", "0",
        "--use-server-token-count", "--random-seed", "0", "--output-artifact-dir", str(out),
        "--ui-type", "none", "--no-auto-plot",
    ]  # fmt: skip
    # Without the Hugging Face offline switches: aiperf 0.13 then takes an absolute tokenizer path as a local
    # folder and asks no hub; with them, it looks the path up in the hub cache and fails.
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work, timeout=1200, check=False)
    (work / "aiperf.log").write_text(result.stdout + result.stderr)
    summaries = sorted(out.rglob("profile_export_aiperf.json"))
    if result.returncode != 0 or not summaries:
        raise RuntimeError(f"aiperf exited {result.returncode}: {(result.stdout + result.stderr).strip()[-1500:]}")
    raw = json.loads(summaries[-1].read_text())
    keep = {}
    for key in ("output_token_throughput", "request_throughput", "time_to_first_token", "inter_token_latency",
                "request_latency", "output_sequence_length", "input_sequence_length", "request_count",
                "error_request_count"):
        value = raw.get(key)
        if isinstance(value, dict):
            keep[key] = {k: v for k, v in value.items() if k in ("unit", "avg", "p50", "p90", "p99", "min", "max")}
        elif value is not None:
            keep[key] = value
    return {"command": " ".join(command[1:]), "summary": keep}


# --------------------------------------------------------------------------------------------- the benchmark


def bench_fronts(repository: Path, model_name: str, plan: FrontsPlan, threads: int, variant: str,
                 work: Path | None = None) -> dict[str, Any]:
    from bench.data import BUILTIN_PROMPTS
    from bench.llm import chat_prompts
    from bench.suite import compare, median_point, single_model_repository
    from server.generation.chat_template import ChatTemplate
    from server.process import ServerProcess

    work = work or Path(tempfile.mkdtemp(prefix="nlpserve-bench-openai-"))
    model = inprocess.ModelFiles.find(repository, model_name)
    if ChatTemplate.from_folder(model.folder) is not None:
        prompts = chat_prompts(model, 1)
        inputs: list[Any] = list(prompts.conversations)
        source, prompt_tokens = prompts.source, prompts.length
    else:  # a plain generator (the demo's docgpt): completions of the built-in prompts
        inputs = list(BUILTIN_PROMPTS)
        source, prompt_tokens = f"{len(inputs)} built-in prompts (no chat template: completions)", 16
    binary = aiperf_venv() if plan.aiperf_requests else None
    single = single_model_repository(repository, model_name, work)
    runner = asyncio.Runner()
    rounds: list[dict[str, Any]] = []
    result: dict[str, Any] = {"model": model.summary(), "variant": variant, "prompts": source}
    try:
        with ServerProcess(single, args=["--device", "cpu", "--variant", variant, "--intra-op-threads", str(threads),
                                         "--log-level", "WARNING"], startup_timeout=300.0) as srv:
            base_url = f"{srv.http_url}/v1"
            passes = {"nlpserve.v1": (nlpserve_pass, srv.target), "openai": (openai_pass, base_url)}

            def measure(label: str, requests: int, max_tokens: int) -> dict[str, Any]:
                run_pass, address = passes[label]
                return runner.run(run_pass(address, model_name, inputs, plan.streams, requests, max_tokens))

            for label in passes:  # warm-up: a short pass on each front
                measure(label, plan.streams, 4)
            for r in range(plan.rounds):
                order = list(passes) if r % 2 == 0 else list(passes)[::-1]
                entry = {label: measure(label, plan.requests, plan.max_tokens) for label in order}
                logger.info("openai: round %d: %s", r + 1, ", ".join(
                    f"{k} {v['tokens_per_s']:.1f} tok/s ({v['tokens']} tokens, {v['ok']}/{v['requests']} ok)"
                    for k, v in entry.items()))
                rounds.append(entry)
            if binary is not None:
                logger.info("openai: aiperf, %d requests at concurrency %d", plan.aiperf_requests, plan.streams)
                endpoint = "chat" if not isinstance(inputs[0], str) else "completions"
                try:
                    result["aiperf"] = run_aiperf(binary, srv.http_url, model, plan, work, prompt_tokens, endpoint)
                except (RuntimeError, subprocess.TimeoutExpired) as e:  # the comparison above stands without it
                    logger.error("openai: aiperf failed: %s", e)
                    result["aiperf"] = {"error": str(e)[-2000:]}
    finally:
        runner.close()
    result["rounds"] = rounds
    result["points"] = {label: median_point([r[label] for r in rounds]) for label in rounds[0]}
    ctx = SimpleNamespace(comparisons=[])
    compare(
        ctx, id="openai/openai-vs-nlpserve", group="OpenAI-compatible front",  # type: ignore[arg-type]
        model=f"{model_name} {variant}", metric="tokens/s",
        title=f"OpenAI front (openai SDK, SSE) / nlpserve.v1 (AsyncClient, gRPC), {plan.streams} streams, "
        f"{plan.max_tokens} tokens",
        a="OpenAI front", b="nlpserve.v1", a_values=[r["openai"]["tokens_per_s"] for r in rounds],
        b_values=[r["nlpserve.v1"]["tokens_per_s"] for r in rounds], target=0.9,
        note="the same requests, greedy; tokens are the server's counts",
    )
    result["comparisons"] = ctx.comparisons
    same = {r["openai"]["tokens"] == r["nlpserve.v1"]["tokens"] for r in rounds}
    result["same_token_counts"] = same == {True}
    return result


def run(args: Any, info: dict[str, Any]) -> dict[str, Any]:
    """`python -m bench openai`: the figures under `results["openai"]`, and the comparison."""
    from bench.llm import DEFAULT_REPOSITORY
    from bench.suite import plan_of

    plan = plan_of(args, OPENAI_QUICK, OPENAI_FULL, "openai")
    repository = args.models or DEFAULT_REPOSITORY
    name = args.llm_model
    if not (repository / name).is_dir():
        repository = args.models or (models.quick_repository(args.rebuild_models) if args.quick
                                     else models.demo_repository(None, args.rebuild_models))
        name = "docgpt" if not (repository / name).is_dir() else name
    threads = args.threads or info["cpus_usable"]
    variant = args.variant
    figures = bench_fronts(repository, name, plan, threads, variant)
    figures["repository"] = str(repository)
    comparisons = figures.pop("comparisons")
    notes = [NOTE]
    if not figures["same_token_counts"]:
        notes.append("the two fronts generated different token counts in some round (see the rounds)")
    return {"plan": asdict(plan), "openai": figures, "comparisons": comparisons,
            "settings": {"device": "cpu", "variant": variant, "intra_op_threads": threads},
            "texts": figures["prompts"], "notes": notes}


# ------------------------------------------------------------------------------------------------- Markdown


def markdown_tables(o: dict[str, Any]) -> list[str]:
    from bench.report import _f, _table

    lines = [f"## OpenAI front against nlpserve.v1: {o['model']['name']} {o['variant']}", "",
             f"Prompts: {o['prompts']}. Per pass, medians of the rounds:", ""]
    lines += _table(["front", "streams", "requests ok", "tokens", "tokens/s", "TTFT p50 ms", "TTFT p99 ms",
                     "inter-chunk p50 ms", "inter-chunk p99 ms", "load average"],
                    [[label, p["streams"], f"{p['ok']}/{p['requests']}", p["tokens"], p["tokens_per_s"],
                      p["ttft_ms"]["p50"], p["ttft_ms"]["p99"], p["inter_chunk_ms"]["p50"], p["inter_chunk_ms"]["p99"],
                      p["load_average"]] for label, p in o["points"].items()])
    lines += ["Per round (tokens/s): " + "; ".join(
        ", ".join(f"{k} {_f(v['tokens_per_s'])}" for k, v in r.items()) for r in o["rounds"]), ""]
    if "error" in o.get("aiperf", {}):
        lines += [f"aiperf failed: {o['aiperf']['error'][-300:]}", ""]
    elif "aiperf" in o:
        s = o["aiperf"]["summary"]
        lines += ["aiperf against the OpenAI front (`aiperf " + o["aiperf"]["command"].split(" --output")[0] + "`):", ""]
        rows = [[key, v.get("unit", ""), v.get("avg"), v.get("p50"), v.get("p99")] for key, v in s.items()
                if isinstance(v, dict)]
        lines += _table(["metric", "unit", "avg", "p50", "p99"], rows)
    return lines


def markdown(results: dict[str, Any]) -> str:
    from bench import report

    head = report.markdown(results)
    return "\n".join([head.rstrip("\n"), "", *markdown_tables(results["openai"])])


def summary_lines(o: dict[str, Any]) -> list[str]:
    lines = [f"openai: {label} {p['tokens_per_s']:.1f} tokens/s at {p['streams']} streams (median)"
             for label, p in o["points"].items()]
    if "summary" in o.get("aiperf", {}):
        throughput = o["aiperf"]["summary"].get("output_token_throughput", {})
        lines.append(f"openai: aiperf output token throughput {throughput.get('avg')} {throughput.get('unit', '')}")
    return lines

