"""`python -m bench {classify,generate,baseline,llm,hostile,embed,all} [--quick]`: runs the benchmarks, writes
`bench/results/<date>-<machine>.json` (every raw figure), a Markdown table and PNG plots, and prints the
ratios last."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"

NOISE_NOTE = (
    "The machine may be shared with other jobs (see the load averages), so absolute figures are noisy; every "
    "comparison therefore runs both sides in the same run, in alternating rounds, and reports the median "
    "per-round ratio. The 1-minute load average is recorded with every point."
)
LLM_NOTE = (
    "Llama-family comparison: the server is driven through the project's AsyncClient (chat_stream), the "
    "onnxruntime-genai loop runs in the bench process on pre-tokenized prompts (the same tokens the server's "
    "chat template gives) with the server's session settings; all prompts have one token length, as "
    "onnxruntime-genai 0.18 computes padded rows of a static batch wrongly on the CPU."
)
PREVIOUS_HINT = "c01301d"  # bench.hostile.PREVIOUS, without importing it for --help
HOSTILE_NOTE = (
    "Hostile input: victims (closed loop, a 10 ms pause between calls, each on its own connection, in the bench "
    "process) send small Classify and ListModels calls throughout; in each phase's hostile window other clients "
    "(a separate process, one closed-loop client per kind, each on its own connection) send one kind of large "
    "request for a bounded time and count; a victim call counts in the window it was sent in. RSS: VmRSS of the "
    "server process, sampled every 50 ms. The two sides run one after the other, each on a server of its own."
)
EMBED_NOTE = (
    "Sentence embeddings: every side embeds the same texts once per round, the server through gRPC (raw stubs, "
    "closed loop on one connection), sentence-transformers' encode and the ONNX Runtime loop in the bench process "
    "with the server's thread count. The ratios come from a back-to-back block after each round's sweep (the server "
    "at its best point so far by the sweeps' medians), the sides alternating over slices of the texts."
)
CLIENT_NOTE = (
    "The load generator (Python, asyncio gRPC) runs on the same CPUs as the server and takes part of them; the "
    "in-process baselines pay no such cost."
)


# The commands whose plan, figures and Markdown live in a module of their own (the key is also where the results
# keep its figures).
OWN_MODULES = {"embed": "bench.embed", "triton": "bench.triton", "openai": "bench.openai_front",
               "longprompt": "bench.long_prompt"}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true",
                        help="the quick plan on the tiny demo models (under 5 minutes on 2 cores)")
    common.add_argument("--models", type=Path,
                        help="the demo model repository (default: models/ when built, else built into .cache/; with --quick, "
                        "the quick models built into .cache/); with `llm`, the repository holding the Llama-family "
                        "model (default: models/)")
    common.add_argument("--llm-models", type=Path,
                        help="`all`: the repository holding the Llama-family model (default: models/); skipped when "
                        "the model is absent")
    common.add_argument("--llm-model", default="smollm2", help="the Llama-family model's name (default smollm2)")
    common.add_argument("--sizes", choices=["demo", "sized", "both"],
                        help="full plan: the demo models, the BERT-base/GPT-2-small-sized ones, or both (default)")
    common.add_argument("--data", type=Path, help="shared data folder (default: ../shared/data when present)")
    common.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    common.add_argument("--name", help="file stem of the results (default <date>-<machine>[-<command>])")
    common.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads, server and in-process alike (default: usable CPUs)")
    common.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    common.add_argument("--variant", choices=["fp32", "fp16", "int8", "opt"], default="fp32")
    common.add_argument("--kv-cache", choices=["concat", "shared-buffer"], default="concat",
                        help="--sizes sized: GPT-2-small's graph, torch.onnx's concatenating one (default) or the "
                        "slot cache's (export generator --kv-cache shared-buffer)")
    common.add_argument("--rounds", type=int, help="alternating rounds per comparison (default: the plan's)")
    common.add_argument("--no-profile", action="store_true", help="all: skip the py-spy profiles")
    common.add_argument("--no-torch", action="store_true", help="skip the PyTorch no-KV-cache baseline")
    common.add_argument("--rebuild-models", action="store_true", help="rebuild the cached benchmark models")
    common.add_argument("--log-level", default="INFO")
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("classify", "classification: in-process limit, concurrency sweep, batching comparisons, open loop"),
        ("generate", "generation: continuous batching against one active sequence and the in-process decode loop"),
        ("baseline", "the in-process baselines only (no server)"),
        ("llm", ("a Llama-family decoder (onnxruntime-genai builder export, fp32 and int4) through the server "
                 "against onnxruntime-genai's own generator loop on the same file")),
        ("all", "everything, then the py-spy profiles"),
    ):
        commands.add_parser(name, parents=[common], help=text, description=text)
    text = ("hostile input: victims' latency and the server's memory during a stream of the largest requests, on "
            f"the current server and on the one before the fixes ({PREVIOUS_HINT})")
    hostile = commands.add_parser("hostile", parents=[common], help=text, description=text)
    hostile.add_argument("--previous", metavar="REV",
                         help=f"the previous server's commit, run from a temporary git worktree (default {PREVIOUS_HINT}; "
                         "with --quick, none unless given)")
    hostile.add_argument("--previous-dir", type=Path, metavar="DIR",
                         help="an existing checkout of the previous server to run instead of a temporary worktree")
    hostile.add_argument("--no-previous", action="store_true", help="the current server only")
    hostile.add_argument("--generator", help="the generator sent the prompts (default smollm2 when the repository "
                         "has it, else docgpt)")
    hostile.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                         help="an environment variable for both servers (e.g. MALLOC_ARENA_MAX=2); repeatable")
    text = ("sentence embeddings: the server's Embed at concurrency 1-64 (1 text per request) and 1-4 (32 texts), "
            "against sentence-transformers' encode and an in-process ONNX Runtime loop on the same model and texts; "
            "fp32 and opt (or --variant) servers")
    commands.add_parser("embed", parents=[common], help=text, description=text)
    text = ("classification through perf_analyzer: the server's Open Inference Protocol front against PyTriton "
            "(Triton 2.51, Python backend) on the same ONNX file and sentences, concurrency 1-32")
    commands.add_parser("triton", parents=[common], help=text, description=text)
    text = ("generation: the OpenAI-compatible HTTP front (openai SDK, SSE) against nlpserve.v1 (AsyncClient, gRPC) "
            "on the same server and model at 16 streams, then aiperf against the OpenAI front")
    commands.add_parser("openai", parents=[common], help=text, description=text)
    text = ("long prompts arriving while 16 streams decode: inter-token latency with chunked prefill against without, "
            "on the Llama-family model (--models DIR, default models/; --llm-model)")
    commands.add_parser("longprompt", parents=[common], help=text, description=text)
    again = commands.add_parser("report", help="rewrite the Markdown table and plots of a results JSON",
                                description="rewrite the Markdown table and plots of a results JSON (same folder)")
    again.add_argument("results", type=Path, help="a bench/results/*.json file")
    again.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for chatty in ("httpx", "httpx2"):  # one line per HTTP request (the openai SDK's)
        logging.getLogger(chatty).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # PyTorch's OpenMP threads spin while they wait for each other; on a busy machine a descheduled peer makes
    # every parallel region wait a time slice (measured here: 50x slower). ONNX Runtime sessions spin as the
    # server's do (bench/inprocess.py: by default, not at all). Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bench.llm import ModelAbsent

    try:
        results = rewrite(args.results) if args.command == "report" else run(args)
    except ModelAbsent as e:
        print(f"bench: llm skipped: {e}", file=sys.stderr)
        return 0
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        logger.debug("failed", exc_info=True)
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    print_ratios(results)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Heavy imports after logging is set up (and after --help, which needs none of them).
    from bench import llm, machine, models, report, suite
    from bench.data import load_texts, long_texts

    started = time.perf_counter()
    info = machine.machine_info()
    if args.command == "hostile":
        return run_hostile(args, info, started)
    if args.command in OWN_MODULES:
        return run_own(args, info, started)
    plan = suite.QUICK if args.quick else suite.GPU if args.device == "cuda" else suite.FULL
    llm_plan = llm.LLM_QUICK if args.quick else llm.LLM_FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
        llm_plan = dataclasses.replace(llm_plan, rounds=args.rounds)
    # The Llama-family model: found (or reported absent) before anything is measured.
    llm_repository = (args.models if args.command == "llm" else args.llm_models) or llm.DEFAULT_REPOSITORY
    skipped: list[str] = []
    if args.command == "llm":
        if args.device != "cpu":
            raise ValueError(f"llm: {llm.CPU_ONLY}")
        llm.find_model(llm_repository, args.llm_model)  # ModelAbsent: the command is skipped
    elif args.command == "all":
        try:
            if args.device != "cpu":
                raise llm.ModelAbsent(llm.CPU_ONLY)
            llm.find_model(llm_repository, args.llm_model)
        except llm.ModelAbsent as e:
            skipped.append(f"llm skipped: {e}")
            logger.warning("%s", skipped[-1])
    texts = load_texts(args.data)
    if plan is suite.GPU:
        texts = dataclasses.replace(texts, sentences=long_texts(texts.sentences),
                                    source=texts.source + ", joined into texts of 160+ words (128 tokens)")
    threads = args.threads or info["cpus_usable"]
    ctx = suite.Context(plan=plan, texts=texts, threads=threads, device=args.device, variant=args.variant)

    # (repository, classifier, generator) per model size
    sets: list[tuple[Path, str, str]] = []
    if args.command == "llm":
        pass
    elif args.quick:
        repo = args.models or models.quick_repository(args.rebuild_models)
        sets.append((repo, "sentiment", "docgpt"))
    else:
        sizes = args.sizes or "both"
        if sizes in ("demo", "both"):
            sets.append((models.demo_repository(args.models, args.rebuild_models), "sentiment", "docgpt"))
        if sizes in ("sized", "both"):
            needed = {"classify": (models.BERT_BASE,), "generate": (models.GPT2_SMALL,)}.get(
                args.command, (models.BERT_BASE, models.GPT2_SMALL))
            sets.append((models.sized_repository(args.rebuild_models, args.variant, needed, args.kv_cache),
                         models.BERT_BASE, models.GPT2_SMALL))

    notes = [NOISE_NOTE]
    if args.command != "baseline":
        notes.append(CLIENT_NOTE)
    if args.command in ("llm", "all") and not skipped:
        notes.append(LLM_NOTE)
    notes += skipped
    if not info["gpus"] and args.command != "llm":
        notes.append(
            "No GPU was at hand for this run: the GPU benchmarks (CUDA provider, fp32 and fp16; BERT-base at "
            "sequence length 128, batch 1/8/32; GPT-2-small at 1/16/64 streams) were not run."
        )
    results: dict[str, Any] = {
        **_header(args, info),
        "plan": dataclasses.asdict(llm_plan) if args.command == "llm" else suite.plan_dict(plan),
        "settings": {"device": args.device,
                     **({"variants": list(llm_plan.variants)} if args.command == "llm" else {"variant": args.variant}),
                     "intra_op_threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     **({"kv_cache": args.kv_cache} if args.kv_cache != "concat" else {})},
        "texts": "the llm plan's built-in instructions" if args.command == "llm" else texts.source,
        "notes": notes,
    }
    try:
        if args.command == "baseline":
            results["baselines"] = {}
            for repo, clf, gen in sets:
                results["baselines"] |= suite.bench_baselines(ctx, repo, clf, None if args.no_torch else gen)
        # The profiles (commands `all` and `llm`) are taken on every model's servers, after their measurements.
        profile = args.command in ("all", "llm") and not args.no_profile
        profiles = {}
        if args.command in ("classify", "all"):
            results["classification"] = {}
            for repo, clf, _ in sets:
                results["classification"][clf] = suite.bench_classifier(ctx, repo, clf, profile=profile)
                if "profile" in results["classification"][clf]:
                    profiles[f"classify, {clf}"] = results["classification"][clf].pop("profile")
        if args.command in ("generate", "all"):
            results["generation"] = {}
            for repo, _, gen in sets:
                results["generation"][gen] = suite.bench_generator(
                    ctx, repo, gen, with_torch=not args.no_torch, profile=profile)
                if "profile" in results["generation"][gen]:
                    profiles[f"generate, {gen}"] = results["generation"][gen].pop("profile")
        if args.command == "llm" or (args.command == "all" and not skipped):
            results["llm"] = {args.llm_model: llm.bench_llm(ctx, llm_plan, llm_repository, args.llm_model, profile=profile)}
            for variant, v in results["llm"][args.llm_model]["variants"].items():
                if "profile" in v:
                    profiles[f"llm, {args.llm_model} {variant}"] = v.pop("profile")
        if profiles:
            results["profiles"] = profiles
    finally:
        ctx.runner.close()
    results["comparisons"] = ctx.comparisons
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    stem = args.name or "-".join(
        [results["created"][:10], results["machine_slug"]]
        + ([] if args.command == "all" else [args.command])
        + (["quick"] if args.quick else [])
    )
    paths = report.write_results(results, args.out, stem)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results


def _header(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    """What every results file begins with: the schema, when, the command, the machine."""
    from bench import machine

    return {
        "schema": 1,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(args.argv),
        "machine": info,
        "machine_slug": machine.machine_slug(info),
    }


def run_hostile(args: argparse.Namespace, info: dict[str, Any], started: float) -> dict[str, Any]:
    """`python -m bench hostile`: its own plan and figures, the results written as every other command's."""
    from bench import hostile, report

    for kv in args.server_env:
        if "=" not in kv or not kv.split("=", 1)[0]:
            raise ValueError(f"--server-env {kv!r}: expected KEY=VALUE")
    results: dict[str, Any] = {**_header(args, info), "notes": [NOISE_NOTE, CLIENT_NOTE, HOSTILE_NOTE]}
    results |= hostile.run(args, info)
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    stem = args.name or "-".join([results["created"][:10], results["machine_slug"], "hostile"]
                                 + (["quick"] if args.quick else []))
    paths = report.write_results(results, args.out, stem)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results


def run_own(args: argparse.Namespace, info: dict[str, Any], started: float) -> dict[str, Any]:
    """`python -m bench embed|triton|openai`: each its own plan and figures (OWN_MODULES), the results written as
    every other command's."""
    module = importlib.import_module(OWN_MODULES[args.command])
    results: dict[str, Any] = {**_header(args, info), "notes": [NOISE_NOTE, CLIENT_NOTE]
                               + ([EMBED_NOTE] if args.command == "embed" else [])}
    figures = module.run(args, info)
    results["notes"] += figures.pop("notes")
    results |= figures
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    stem = args.name or "-".join([results["created"][:10], results["machine_slug"], args.command]
                                 + (["quick"] if args.quick else []))
    paths = write_results(results, args.out, stem)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results


def write_results(results: dict[str, Any], out: Path, stem: str) -> dict[str, Path]:
    """The report writer's files; an OWN_MODULES run's Markdown also has its own tables (bench/embed.py,
    bench/triton.py, bench/openai_front.py)."""
    from bench import report

    paths = report.write_results(results, out, stem)
    for key, name in OWN_MODULES.items():
        if key in results:
            report._write_atomic(paths["md"], importlib.import_module(name).markdown(results))
    return paths


def rewrite(path: Path) -> dict[str, Any]:
    """Rewrites the Markdown and the plots of a results file from its JSON (after a change to the writer)."""
    import json

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    results = json.loads(path.read_text())
    paths = write_results(results, path.parent, path.stem)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results


def print_ratios(results: dict[str, Any]) -> None:
    """The summary on stdout: where the files went, then the ratios (last, so that they are what one sees)."""
    print(f"results: {results['paths']['json']} (+ .md, {len(results['paths']) - 2} plots); "
          f"{results.get('elapsed_s', 0):.0f} s")
    for note in results.get("notes", []):
        if note.startswith("llm skipped"):
            print(note)
    for key, name in OWN_MODULES.items():
        if key in results:
            print("\n".join(importlib.import_module(name).summary_lines(results[key])))
    for side in results.get("hostile", {}).get("sides", {}).values():
        for phase in side["phases"]:
            rss = phase["rss_mb"]
            print(f"{side['label']}, {phase['name']}: server RSS {rss['before']} MB before, {rss['peak']} peak, "
                  f"{rss['after']} after {phase['recovery']['seconds']:.0f} s")
    for comparison in results.get("comparisons", []):
        target = ""
        if comparison["target"] is not None:
            sign = ">=" if comparison["higher_is_better"] else "<="
            verdict = "met" if comparison["met"] else "NOT met"
            target = f"  (target {sign} {comparison['target']:g}: {verdict})"
        ratio = comparison["ratio"]
        shown = f"{ratio:6.2f}" if ratio is not None else "     -"
        print(f"{shown}  {comparison['title']} [{comparison['model']}, {comparison['metric']}]{target}")


if __name__ == "__main__":
    sys.exit(main())
