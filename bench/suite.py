"""The benchmarks and their comparisons. Every comparison measures its sides in the same run, in rounds, and
alternates which side goes first from one round to the next; its figure is the median of the per-round ratios.

The servers are real `python -m server` processes (started with `server.process.ServerProcess` on free ports,
one model each); the load generator runs in this process, with asyncio, so it is a separate process from the
server it measures.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import inprocess, load, models, profiling
from bench.data import Texts
from bench.stats import ratio_of_rounds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How much to measure. QUICK fits `python -m bench all --quick` in under 5 minutes on 2 cores."""

    name: str
    rounds: int
    classify_window: load.Window
    generate_window: load.Window
    sweep_concurrency: tuple[int, ...]
    compare_concurrency: tuple[int, ...]
    inprocess_batches: tuple[int, ...]
    inprocess_seconds: float
    open_loop_fractions: tuple[float, ...]
    streams: tuple[int, ...]
    max_new_tokens: int
    decode_seconds: float
    profile_seconds: float


QUICK = Plan(
    name="quick",
    rounds=2,
    classify_window=load.Window(warmup_s=0.3, duration_s=1.0, min_requests=30, max_duration_s=4.0),
    generate_window=load.Window(warmup_s=0.3, duration_s=1.5, min_requests=2, max_duration_s=5.0),
    sweep_concurrency=(1, 8, 32),
    compare_concurrency=(1, 8, 32),
    inprocess_batches=(1, 4, 16),
    inprocess_seconds=0.5,
    open_loop_fractions=(0.5,),
    streams=(1, 4, 16),
    max_new_tokens=16,
    decode_seconds=0.5,
    profile_seconds=3.0,
)

FULL = Plan(
    name="full",
    rounds=3,
    classify_window=load.Window(warmup_s=1.0, duration_s=4.0, min_requests=200, max_duration_s=12.0),
    generate_window=load.Window(warmup_s=1.5, duration_s=6.0, min_requests=4, max_duration_s=20.0),
    sweep_concurrency=(1, 2, 4, 8, 16, 32, 64),
    compare_concurrency=(1, 8, 32),
    inprocess_batches=(1, 2, 4, 8, 16, 32),
    inprocess_seconds=3.0,
    open_loop_fractions=(0.25, 0.5, 0.75, 0.9),
    streams=(1, 4, 16, 32),
    max_new_tokens=64,
    decode_seconds=4.0,
    profile_seconds=12.0,
)


# On a GPU (`--device cuda`): the GPU matrix, BERT-base at sequence length 128 (long texts, truncated to
# the model's 128 tokens), batch and concurrency 1/8/32; GPT-2-small at 1/16/64 streams.
GPU = replace(
    FULL,
    name="gpu",
    sweep_concurrency=(1, 8, 32, 64),
    inprocess_batches=(1, 8, 32),
    streams=(1, 16, 64),
)


@dataclass
class Context:
    """What every benchmark of one run shares."""

    plan: Plan
    texts: Texts
    threads: int
    device: str = "cpu"
    variant: str = "fp32"
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nlpserve-bench-")))
    runner: asyncio.Runner = field(default_factory=asyncio.Runner)
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    def run(self, coroutine: Any) -> Any:
        """Runs a coroutine of the load generator on the one event loop of this run."""
        return self.runner.run(coroutine)

    def server_args(self) -> list[str]:
        return [
            "--device", self.device, "--variant", self.variant, "--intra-op-threads", str(self.threads),
            "--log-level", "WARNING",
        ]


# --------------------------------------------------------------------------------------------- servers


def single_model_repository(repository: Path, name: str, work: Path) -> Path:
    """A repository holding only `name` (a link to it), so that each server loads the one model it is measured on."""
    folder = work / f"repo-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / name
    if not link.exists():
        link.symlink_to((repository / name).resolve(), target_is_directory=True)
    return folder


@contextmanager
def serving(ctx: Context, repository: Path, name: str, configs: dict[str, list[str]]) -> Iterator[dict[str, Any]]:
    """One server process per configuration, all up at once so that their measurements can alternate."""
    from server.process import ServerProcess  # the server's own helper: real processes on free ports

    single = single_model_repository(repository, name, ctx.work)
    with ExitStack() as stack:
        servers = {}
        for label, extra in configs.items():
            t0 = time.perf_counter()
            servers[label] = stack.enter_context(ServerProcess(single, args=[*ctx.server_args(), *extra]))
            logger.info("server %s (%s) ready in %.1f s", label, " ".join(extra) or "defaults",
                        time.perf_counter() - t0)
        yield servers


def server_pid(server: Any) -> int:
    """The server's process id (from its ready file, via ServerProcess)."""
    return int(server.pid)


# --------------------------------------------------------------------------------------------- comparisons


def alternating(round_index: int, sides: Sequence[tuple[str, Callable[[], dict[str, Any]]]]) -> dict[str, Any]:
    """Measures every side once, starting with a different side each round."""
    shift = round_index % len(sides)
    results = {}
    for label, measure in [*sides[shift:], *sides[:shift]]:
        results[label] = measure()
    return results


def compare(
    ctx: Context,
    *,
    id: str,
    group: str,
    model: str,
    title: str,
    metric: str,
    a: str,
    b: str,
    a_values: Sequence[float],
    b_values: Sequence[float],
    target: float | None = None,
    higher_is_better: bool = True,
    note: str = "",
) -> dict[str, Any]:
    """Records one comparison: the per-round values of both sides and the median per-round ratio a/b."""
    figures = ratio_of_rounds(a_values, b_values)
    met = None
    if target is not None and figures["ratio"] is not None:
        ratio = float(figures["ratio"])
        met = ratio >= target if higher_is_better else ratio <= target
    entry = {
        "id": id,
        "group": group,
        "model": model,
        "title": title,
        "metric": metric,
        "a": a,
        "b": b,
        "a_values": list(a_values),
        "b_values": list(b_values),
        "a_median": round(statistics.median(a_values), 3) if a_values else None,
        "b_median": round(statistics.median(b_values), 3) if b_values else None,
        **figures,
        "target": target,
        "higher_is_better": higher_is_better,
        "met": met,
        "note": note,
    }
    ctx.comparisons.append(entry)
    logger.info("%s: %s", id, entry["ratio"])
    return entry


def _get(point: dict[str, Any], path: str) -> float:
    value: Any = point
    for key in path.split("."):
        value = value[key]
    return float(value) if value is not None else float("nan")


def median_point(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-field medians of the same point measured in several rounds (numbers only; nested dicts too)."""
    out: dict[str, Any] = {}
    for key, value in points[0].items():
        if isinstance(value, dict) and all(isinstance(p.get(key), dict) for p in points):
            out[key] = median_point([p[key] for p in points])
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values = [p[key] for p in points if isinstance(p.get(key), int | float)]
            median = statistics.median(values) if values else None
            if median is not None and all(isinstance(v, int) for v in values) and median == int(median):
                out[key] = int(median)  # counts and settings stay integers
            else:
                out[key] = round(median, 3) if median is not None else None
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------ classification


def bench_classifier(
    ctx: Context, repository: Path, name: str, compare_batching: bool = True, profile: bool = False
) -> dict[str, Any]:
    """The in-process limit and the server: a concurrency sweep, the limit comparison, the batching comparisons
    (with max_batch_size=1 and with the fixed-delay policy) at the compare concurrencies, and open-loop rates."""
    plan = ctx.plan
    model = inprocess.ModelFiles.find(repository, name)
    sentences = ctx.texts.sentences
    classifier = inprocess.Classifier(model, ctx.variant, ctx.threads, ctx.device)
    result: dict[str, Any] = {"model": model.summary()}

    logger.info("%s: in-process batch sweep %s", name, plan.inprocess_batches)
    batches = [inprocess.measure_classifier(classifier, sentences, b, plan.inprocess_seconds)
               for b in plan.inprocess_batches]
    best_batch = max(batches, key=lambda p: p["sequences_per_s"])["batch_size"]
    result["inprocess_batches"] = batches
    result["inprocess_best_batch_size"] = best_batch

    configs = {"adaptive": []}
    if compare_batching:
        configs |= {"batch1": ["--max-batch-size", "1"], "fixed": ["--batch-policy", "fixed"]}
    requests = load.classify_requests(name, sentences)
    with serving(ctx, repository, name, configs) as servers:

        def closed(label: str, concurrency: int) -> Callable[[], dict[str, Any]]:
            srv = servers[label]
            return lambda: ctx.run(load.classify_closed_loop(
                srv.target, requests, concurrency, plan.classify_window, srv.metrics_url, server_pid(srv)))

        # Every round: the adaptive server at every concurrency, the other configurations beside it (alternating)
        # at the compare concurrencies, then the in-process loop and the server at its best concurrency so far,
        # back to back. The sweep shown is the median of the rounds.
        points = sorted(set(plan.sweep_concurrency) | set(plan.compare_concurrency if compare_batching else ()))
        rounds: list[dict[str, Any]] = []
        best_concurrency = points[0]
        for r in range(plan.rounds):
            logger.info("%s: round %d of %d, concurrency %s", name, r + 1, plan.rounds, points)
            entry: dict[str, Any] = {"configs": {}}
            for c in points:
                labels = list(configs) if compare_batching and c in plan.compare_concurrency else ["adaptive"]
                entry["configs"][str(c)] = alternating(r + c, [(label, closed(label, c)) for label in labels])
            rounds.append(entry)
            sweep = [median_point([e["configs"][str(c)]["adaptive"] for e in rounds]) for c in points]
            best_concurrency = int(max(sweep, key=lambda p: p["sequences_per_s"])["concurrency"])
            entry |= alternating(r, [
                ("inprocess", lambda: inprocess.measure_classifier(
                    classifier, sentences, best_batch, plan.classify_window.duration_s)),
                ("server", closed("adaptive", best_concurrency)),
            ])
        result["rounds"] = rounds
        result["server_sweep"] = [median_point([e["configs"][str(c)]["adaptive"] for e in rounds]) for c in points]
        result["server_best_concurrency"] = best_concurrency

        compare(
            ctx, id=f"classify/{name}/server-vs-inprocess", group="classification: against the limit", model=name,
            title=f"server at concurrency {best_concurrency} / in-process ORT at batch {best_batch}",
            metric="sequences/s", a=f"server, concurrency {best_concurrency}", b=f"in-process, batch {best_batch}",
            a_values=[r["server"]["sequences_per_s"] for r in rounds],
            b_values=[r["inprocess"]["sequences_per_s"] for r in rounds],
            target=0.8,
            note="the server's best concurrency is chosen from the rounds' sweep medians so far",
        )
        summary: dict[str, dict[str, dict[str, Any]]] = {}
        for label in configs if compare_batching else ():
            summary[label] = {str(c): median_point([r["configs"][str(c)][label] for r in rounds])
                              for c in plan.compare_concurrency}
        for c in plan.compare_concurrency if compare_batching else ():
            for other, what in (("batch1", "max_batch_size=1"), ("fixed", "fixed-delay policy")):
                a_pts = [r["configs"][str(c)]["adaptive"] for r in rounds]
                b_pts = [r["configs"][str(c)][other] for r in rounds]
                group = "dynamic batching" if other == "batch1" else "batching policy"
                compare(
                    ctx, id=f"classify/{name}/adaptive-vs-{other}/c{c}/throughput", group=group, model=name,
                    title=f"adaptive batching / {what}, concurrency {c}, throughput", metric="sequences/s",
                    a="adaptive batching", b=what,
                    a_values=[p["sequences_per_s"] for p in a_pts], b_values=[p["sequences_per_s"] for p in b_pts],
                    # the targets, against max_batch_size=1: batching costs nothing at concurrency 1 (within
                    # 5%, the noise of this machine) and raises throughput at 32; the fixed policy is only compared
                    target=(0.95 if c == 1 else 1.0 if c >= 32 else None) if other == "batch1" else None,
                )
                compare(
                    ctx, id=f"classify/{name}/adaptive-vs-{other}/c{c}/p50", group=group, model=name,
                    title=f"adaptive batching / {what}, concurrency {c}, p50 latency", metric="p50 ms",
                    a="adaptive batching", b=what,
                    a_values=[_get(p, "latency_ms.p50") for p in a_pts],
                    b_values=[_get(p, "latency_ms.p50") for p in b_pts],
                    target=1.05 if c == 1 and other == "batch1" else None, higher_is_better=False,
                )
        result["configs_summary"] = summary

        if plan.open_loop_fractions:
            peak = statistics.median(r["server"]["sequences_per_s"] for r in rounds)
            srv = servers["adaptive"]
            open_loop = []
            for fraction in plan.open_loop_fractions:
                rate = max(1.0, round(peak * fraction, 1))
                logger.info("%s: open loop at %.1f requests/s", name, rate)
                point = ctx.run(load.classify_open_loop(srv.target, requests, rate, plan.classify_window,
                                                        srv.metrics_url))
                point["fraction_of_peak"] = fraction
                open_loop.append(point)
            result["open_loop"] = open_loop
        if profile:
            result["profile"] = profile_under_load(ctx, servers["adaptive"], "classify", name)
    return result


# ---------------------------------------------------------------------------------------------- generation


# The sampling settings of the sampled-against-greedy comparison (the issue's: a common chat setting).
SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}


def bench_generator(
    ctx: Context, repository: Path, name: str, with_torch: bool = True, profile: bool = False
) -> dict[str, Any]:
    """Continuous batching at each stream count against one active sequence, against the in-process KV-cache
    decode loop at the same batch size, and the PyTorch no-cache loop, all in the same rounds."""
    plan = ctx.plan
    model = inprocess.ModelFiles.find(repository, name)
    tokens = plan.max_new_tokens
    decoder = inprocess.make_decoder(model, ctx.variant, ctx.threads, ctx.device)
    prompts = decoder.fitting(ctx.texts.prompts, tokens)
    torch_loop = inprocess.TorchNoCache(model, ctx.threads) if with_torch else None
    result: dict[str, Any] = {"model": model.summary(), "max_new_tokens": tokens}
    configs = {
        # room for every stream of the largest point, so that all of them are decoded together
        "continuous": ["--max-active-sequences", str(max(plan.streams))],
        "single": ["--max-active-sequences", "1"],
    }
    requests = [load.generate_request(name, p, tokens) for p in prompts]
    # The same prompts sampled (a seed per request, so every run draws alike), at 16 streams (or the most).
    top = 16 if 16 in plan.streams else max(plan.streams)
    sampled_requests = [load.generate_request(name, p, tokens, **SAMPLED, seed=k) for k, p in enumerate(prompts)]
    with serving(ctx, repository, name, configs) as servers:

        def closed(label: str, streams: int, sent: list[Any] = requests) -> Callable[[], dict[str, Any]]:
            srv = servers[label]
            # Two requests per stream at least (up to the window's longest): streams that start together run
            # in step, and a window of one request each would hinge on where their prefills fall.
            window = replace(plan.generate_window, min_requests=max(plan.generate_window.min_requests, 2 * streams))
            return lambda: ctx.run(load.generate_closed_loop(
                srv.target, sent, streams, window, srv.metrics_url, server_pid(srv)))

        def decode(batch: int) -> Callable[[], dict[str, Any]]:
            return lambda: inprocess.measure_decoder(decoder, prompts, batch, tokens, plan.decode_seconds)

        rounds = []
        for r in range(plan.rounds):
            entry: dict[str, Any] = {"streams": {}}
            for s in plan.streams:
                logger.info("%s: round %d of %d, %d streams", name, r + 1, plan.rounds, s)
                sides = [("continuous", closed("continuous", s)), ("single", closed("single", s)),
                         ("inprocess", decode(s))]
                if s == top:
                    sides.append(("sampled", closed("continuous", s, sampled_requests)))
                entry["streams"][str(s)] = alternating(r + s, sides)
            if torch_loop is not None:
                logger.info("%s: round %d, PyTorch without KV cache", name, r + 1)
                entry["torch_no_cache"] = inprocess.measure_torch_no_cache(
                    torch_loop, prompts, tokens, plan.decode_seconds)
            rounds.append(entry)
        result["rounds"] = rounds
        if profile:
            result["profile"] = profile_under_load(ctx, servers["continuous"], "generate", name)
    result["summary"] = {
        label: {str(s): median_point([r["streams"][str(s)][label] for r in rounds]) for s in plan.streams}
        for label in ("continuous", "single", "inprocess")
    }
    result["summary"]["sampled"] = {str(top): median_point([r["streams"][str(top)]["sampled"] for r in rounds])}
    compare(
        ctx, id=f"generate/{name}/sampled-vs-greedy/s{top}", group="continuous batching", model=name,
        title=f"sampled ({', '.join(f'{k} {v}' for k, v in SAMPLED.items())}) / greedy, {top} streams",
        metric="tokens/s", a="sampled", b="greedy",
        a_values=[r["streams"][str(top)]["sampled"]["tokens_per_s"] for r in rounds],
        b_values=[r["streams"][str(top)]["continuous"]["tokens_per_s"] for r in rounds],
        target=0.97 if name == models.GPT2_SMALL else None,
        note="the same server and prompts; a seed per request",
    )
    if torch_loop is not None:
        result["torch_no_cache"] = median_point([r["torch_no_cache"] for r in rounds])

    for s in plan.streams:
        pts = [r["streams"][str(s)] for r in rounds]
        compare(
            ctx, id=f"generate/{name}/continuous-vs-single/s{s}", group="continuous batching", model=name,
            title=f"continuous batching / one active sequence, {s} streams", metric="tokens/s",
            a="continuous batching", b="max_active_sequences=1",
            a_values=[p["continuous"]["tokens_per_s"] for p in pts],
            b_values=[p["single"]["tokens_per_s"] for p in pts],
            target=7.0 if s == 16 and name == models.GPT2_SMALL else None,  # the targets: GPT-2-small
        )
        compare(
            ctx, id=f"generate/{name}/server-vs-inprocess/s{s}", group="continuous batching: against the limit",
            model=name, title=f"server, {s} streams / in-process ORT decode loop, batch {s}", metric="tokens/s",
            a=f"server, {s} streams", b=f"in-process, batch {s}",
            a_values=[p["continuous"]["tokens_per_s"] for p in pts],
            b_values=[p["inprocess"]["tokens_per_s"] for p in pts],
            target=0.8 if s == 16 and name == models.GPT2_SMALL else None,
        )
    if torch_loop is not None:
        for s in sorted({1, 16} & set(plan.streams)):
            compare(
                ctx, id=f"generate/{name}/server-vs-pytorch-no-cache/s{s}", group="against PyTorch without KV cache",
                model=name, title=f"server, {s} streams / PyTorch loop without KV cache, one request at a time",
                metric="tokens/s", a=f"server, {s} streams", b="PyTorch, no KV cache",
                a_values=[r["streams"][str(s)]["continuous"]["tokens_per_s"] for r in rounds],
                b_values=[r["torch_no_cache"]["tokens_per_s"] for r in rounds],
            )
    return result


# ----------------------------------------------------------------------------------------------- baselines


def bench_baselines(ctx: Context, repository: Path, classifier: str | None, generator: str | None) -> dict[str, Any]:
    """The in-process baselines alone, no server: classification batch sweep, decode loop, PyTorch no-cache."""
    plan = ctx.plan
    result: dict[str, Any] = {}
    if classifier:
        model = inprocess.ModelFiles.find(repository, classifier)
        loop = inprocess.Classifier(model, ctx.variant, ctx.threads, ctx.device)
        result[classifier] = {
            "model": model.summary(),
            "inprocess_batches": [inprocess.measure_classifier(loop, ctx.texts.sentences, b, plan.inprocess_seconds)
                                  for b in plan.inprocess_batches],
        }
    if generator:
        model = inprocess.ModelFiles.find(repository, generator)
        decoder = inprocess.make_decoder(model, ctx.variant, ctx.threads, ctx.device)
        torch_loop = inprocess.TorchNoCache(model, ctx.threads)
        result[generator] = {
            "model": model.summary(),
            "inprocess_decode": [
                inprocess.measure_decoder(decoder, ctx.texts.prompts, s, plan.max_new_tokens, plan.decode_seconds)
                for s in plan.streams
            ],
            "torch_no_cache": inprocess.measure_torch_no_cache(
                torch_loop, ctx.texts.prompts, plan.max_new_tokens, plan.decode_seconds),
        }
    return result


# ------------------------------------------------------------------------------------------------- profile


def profile_under_load(ctx: Context, srv: Any, kind: str, name: str) -> dict[str, Any]:
    """py-spy on a server under load (classification at concurrency 32, generation at 16 streams): the share of
    its time inside ONNX Runtime and the top costs outside it."""
    seconds = ctx.plan.profile_seconds
    window = load.Window(warmup_s=1.0, duration_s=seconds + 1.0, min_requests=0, max_duration_s=seconds + 1.0)
    raw = ctx.work / f"py-spy-{kind}-{name}.txt"
    if kind == "classify":
        requests = load.classify_requests(name, ctx.texts.sentences)
        coroutine = load.classify_closed_loop(srv.target, requests, 32, window, srv.metrics_url)
    else:
        prompts = [load.generate_request(name, p, ctx.plan.max_new_tokens) for p in ctx.texts.prompts]
        coroutine = load.generate_closed_loop(srv.target, prompts, 16, window, srv.metrics_url)
    logger.info("profiling %s on %s for %.0f s", kind, name, seconds)
    return profiled(ctx, srv, coroutine, window.warmup_s, seconds, raw, name, 32 if kind == "classify" else 16)


def profiled(
    ctx: Context, srv: Any, coroutine: Any, warmup_s: float, seconds: float, raw: Path, model: str, concurrency: int
) -> dict[str, Any]:
    """Runs the load `coroutine` and records the server with py-spy for `seconds` once `warmup_s` passed; returns
    the load's point and the profile's summary (or the error, when py-spy is refused)."""

    async def record_under_load() -> Any:
        task = asyncio.create_task(coroutine)
        await asyncio.sleep(warmup_s)
        recorder = profiling.start_recording(server_pid(srv), seconds, raw)
        point = await task
        await asyncio.to_thread(profiling.finish_recording, recorder)
        return point

    try:
        point = ctx.run(record_under_load())
    except (OSError, RuntimeError) as e:  # py-spy may be refused (no ptrace) on some machines
        logger.warning("profiling %s failed: %s", model, e)
        return {"model": model, "error": str(e)}
    return {"model": model, "load": point, "concurrency": concurrency, **profiling.summarize(raw.read_text())}


def plan_of(args: Any, quick: Any, full: Any, command: str) -> Any:
    """The plan a command's own module runs (`--quick` or full, `--rounds`); CPU only (ValueError naming it)."""
    if args.device != "cpu":
        raise ValueError(f"{command}: CPU only for now")
    plan = quick if args.quick else full
    return replace(plan, rounds=args.rounds) if args.rounds else plan


def plan_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
