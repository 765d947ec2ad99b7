"""Classification through perf_analyzer: `python -m bench triton [--quick]`. The project's Open Inference Protocol
front against PyTriton (NVIDIA Triton 2.51 with a Python model behind its dynamic batcher) on the same ONNX
file and the same sentences, driven by the same client, Triton's own perf_analyzer, in one run:

- the server: the real `python -m server` serving the classifier (default: the demo's `sentiment`, MiniLM-L6),
  perf_analyzer sending `text` BYTES to `inference.GRPCInferenceService` on its gRPC port;
- PyTriton: bench/pytriton_server.py in its own venv (.cache/pytriton-venv, made on first use: nvidia-pytriton,
  and onnxruntime of the server's version), the model function being the bench's in-process loop (tokenize, pad
  to the batch's longest text, run, softmax) with the server's session settings;
- the in-process loop alone (in the bench process, the texts sorted by length into batches of 32: the least
  padding), for scale: the ceiling.

Each point is one perf_analyzer run at one concurrency (1 to 32): the mean of three time windows (its
stability check off: on a shared machine three windows rarely agree within its default 10%, and the rounds and
the alternation do that job here). The two servers alternate point by point, a different side first every round, so
that load from other jobs falls on both alike. The comparison: per round, the server's best throughput among its
points whose p99 is at or below PyTriton's p99 at PyTriton's best point, over PyTriton's best throughput.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench import inprocess, models
from bench.machine import ROOT

logger = logging.getLogger(__name__)

CLASSIFIER = "sentiment"
TRITONCLIENT_VENV = ROOT / ".cache" / "tritonclient-venv"  # deploy/test-tools.sh makes it (perf_analyzer)
LIBB64_DIR = ROOT / ".cache" / "tools" / "root" / "usr" / "lib" / "x86_64-linux-gnu"
PYTRITON_VENV = ROOT / ".cache" / "pytriton-venv"
PYTRITON_SCRIPT = Path(__file__).resolve().parent / "pytriton_server.py"
# PyTriton 0.7.0 bundles Triton 2.51. ONNX Runtime: the CPU build of the version the server runs (its
# onnxruntime-gpu); tokenizers: the server's.
PYTRITON_PINS = ("nvidia-pytriton==0.7.0",)
NOTE = (
    "Classification through perf_analyzer 2.51 (gRPC, one run per concurrency, time windows): the server's Open "
    "Inference Protocol front against PyTriton 0.7.0 (Triton 2.51, Python backend, dynamic batcher, max batch 64, "
    "max_queue_delay 0 unless set) whose model function is the bench's in-process ONNX Runtime loop with the "
    "server's session settings, on the same ONNX file and the same sentences; the servers alternate point by point. "
    "perf_analyzer runs on the same CPUs as the servers."
)


@dataclass(frozen=True)
class TritonPlan:
    """How much to measure. TRITON_QUICK takes about 2 minutes on 2 cores (PyTriton's venv made); TRITON_FULL
    about 8."""

    name: str
    rounds: int
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    texts: int = 512  # perf_analyzer's input data: it cycles through them
    window_ms: int = 2000  # perf_analyzer --measurement-interval; a point is the mean of three such windows
    inprocess_batch: int = 32
    inprocess_seconds: float = 3.0
    max_batch_size: int = 64
    pytriton_queue_delay_us: int = 0


TRITON_QUICK = TritonPlan(name="triton-quick", rounds=1, concurrency=(1, 4, 16), window_ms=1000, texts=128,
                          inprocess_seconds=1.5)
TRITON_FULL = TritonPlan(name="triton-full", rounds=3)


# ------------------------------------------------------------------------------------------------ the tools


def perf_analyzer_env() -> dict[str, str]:
    """The environment for the tritonclient venv's programs: none of the project's Python, perf_analyzer's
    libraries (Debian's libb64, libcudart from the nvidia-cuda-runtime-cu12 wheel) on LD_LIBRARY_PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    cudart = sorted(TRITONCLIENT_VENV.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(LIBB64_DIR), *map(str, cudart[:1]), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    )
    return env


def check_perf_analyzer() -> Path:
    binary = TRITONCLIENT_VENV / "bin" / "perf_analyzer"
    for path in (binary, LIBB64_DIR / "libb64.so.0d"):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `make tools` (bash deploy/test-tools.sh) first")
    return binary


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def pytriton_venv() -> Path:
    """.cache/pytriton-venv, made (or completed) when it lacks a pinned package: PyTriton, and the CPU build of the
    server's ONNX Runtime version with the server's tokenizers, so that both sides run the same runtime."""
    pins = [*PYTRITON_PINS, f"onnxruntime=={_version('onnxruntime-gpu')}", f"tokenizers=={_version('tokenizers')}"]
    python = PYTRITON_VENV / "bin" / "python"
    check = ("import importlib.metadata as m, sys; "
             "sys.exit(any(m.version(p.split('==')[0]) != p.split('==')[1] for p in sys.argv[1:]))")
    if python.exists() and subprocess.run([str(python), "-c", check, *pins], capture_output=True, check=False).returncode == 0:
        return python
    logger.info("making %s (%s): a few hundred MB from PyPI", PYTRITON_VENV, " ".join(pins))
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PYTRITON_VENV)], check=True)
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cannot make {PYTRITON_VENV}: pip install {' '.join(pins)} failed: "
                           f"{result.stderr.strip().splitlines()[-1:] or result.returncode}")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def pytriton_server(python: Path, repository: Path, model: str, threads: int, plan: TritonPlan,
                    work: Path, timeout: float = 300.0) -> Iterator[SimpleNamespace]:
    """bench/pytriton_server.py in PyTriton's venv, on free loopback ports; yields its target once it serves."""
    ports = [free_port() for _ in range(3)]
    # PyTriton's stub process links the running Python's own libpython (Debian's older one otherwise).
    base = subprocess.run([str(python), "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True,
                          check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join([f"{base}/lib", *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    log_path = work / "pytriton.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(python), str(PYTRITON_SCRIPT), "--repository", str(repository), "--model", model,
             "--threads", str(threads), "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
             "--metrics-port", str(ports[2]), "--max-batch-size", str(plan.max_batch_size),
             "--max-queue-delay-us", str(plan.pytriton_queue_delay_us), "--workspace", str(work / "pytriton")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while "READY" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"PyTriton did not start (exit {proc.poll()}); its log ends:\n{tail}")
            time.sleep(0.5)
        yield SimpleNamespace(target=f"127.0.0.1:{ports[0]}", pid=proc.pid, log=log_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ------------------------------------------------------------------------------------------------ measuring

# perf_analyzer's CSV latency columns are in microseconds.
_CSV = {"p50 latency": "p50_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms", "p99 latency": "p99_ms",
        "Avg latency": "mean_ms", "Server Queue": "server_queue_ms", "Server Compute Infer": "server_compute_ms"}


def perf_analyzer_point(binary: Path, target: str, model: str, data: Path, concurrency: int, plan: TritonPlan,
                        work: Path) -> dict[str, Any]:
    """One perf_analyzer run at one concurrency: infer/s, latency percentiles (ms), the server-side times it
    reads from ModelStatistics."""
    report = work / f"pa-{time.monotonic_ns()}.csv"
    command = [
        str(binary), "-i", "grpc", "-u", target, "-m", model, "--input-data", str(data),
        "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(plan.window_ms),
        "--max-trials", "3", "--stability-percentage", "999", "-f", str(report),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=perf_analyzer_env(), cwd=work,
                            timeout=120 + 12 * plan.window_ms / 1000, check=False)
    if result.returncode != 0 or not report.exists():
        raise RuntimeError(f"perf_analyzer against {target} at concurrency {concurrency} exited "
                           f"{result.returncode}: {(result.stdout + result.stderr).strip()[-1500:]}")
    with report.open() as f:
        (row,) = list(csv.DictReader(f))
    point: dict[str, Any] = {"concurrency": concurrency, "infer_per_s": round(float(row["Inferences/Second"]), 2)}
    for column, key in _CSV.items():
        point[key] = round(float(row[column]) / 1000, 3) if row.get(column) not in (None, "") else None
    point["load_average"] = round(os.getloadavg()[0], 2)
    report.unlink()
    return point


def best_under(points: dict[int, dict[str, Any]], p99_ms: float | None) -> dict[str, Any] | None:
    """The point with the highest throughput whose p99 is at or below `p99_ms` (any point when None)."""
    eligible = [p for p in points.values() if p99_ms is None or (p["p99_ms"] is not None and p["p99_ms"] <= p99_ms)]
    return max(eligible, key=lambda p: p["infer_per_s"], default=None)


def bench_triton(repository: Path, texts: list[str], plan: TritonPlan, threads: int, variant: str = "fp32",
                 model_name: str = CLASSIFIER, work: Path | None = None) -> dict[str, Any]:
    from bench.suite import compare, median_point, single_model_repository
    from server.process import ServerProcess

    binary = check_perf_analyzer()
    python = pytriton_venv()
    work = work or Path(tempfile.mkdtemp(prefix="nlpserve-bench-triton-"))
    model = inprocess.ModelFiles.find(repository, model_name)
    if model.kind != "classifier":
        raise ValueError(f"{model_name}: a {model.kind}, not a classifier")
    data = work / "texts.json"
    data.write_text(json.dumps({"data": [{"text": [t]} for t in texts[: plan.texts]]}))
    single = single_model_repository(repository, model_name, work)
    ceiling = inprocess.Classifier(model, variant, threads)
    # The ceiling sees every text first: batches of texts of one length (the least padding).
    by_length = [t for b in ceiling.length_sorted_batches(texts[: plan.texts], plan.inprocess_batch) for t in b]
    sides = ("server", "pytriton")
    rounds: list[dict[str, Any]] = []
    with ExitStack() as stack:
        t0 = time.perf_counter()
        servers = {
            "server": stack.enter_context(ServerProcess(single, args=[
                "--device", "cpu", "--variant", variant, "--intra-op-threads", str(threads), "--http-port", "-1",
                "--log-level", "WARNING"], startup_timeout=300.0)),
            "pytriton": stack.enter_context(pytriton_server(python, single, model_name, threads, plan, work)),
        }
        logger.info("triton: both servers ready in %.1f s", time.perf_counter() - t0)
        for r in range(plan.rounds):
            entry: dict[str, Any] = {side: {} for side in sides}
            for i, c in enumerate(plan.concurrency):
                order = sides if (r + i) % 2 == 0 else sides[::-1]
                for side in order:
                    entry[side][c] = perf_analyzer_point(binary, servers[side].target, model_name, data, c, plan, work)
                logger.info("triton: round %d, concurrency %d: server %.0f/s p99 %.1f ms, PyTriton %.0f/s p99 %.1f ms",
                            r + 1, c, entry["server"][c]["infer_per_s"], entry["server"][c]["p99_ms"],
                            entry["pytriton"][c]["infer_per_s"], entry["pytriton"][c]["p99_ms"])
            entry["inprocess"] = inprocess.measure_classifier(ceiling, by_length, plan.inprocess_batch,
                                                             plan.inprocess_seconds)
            theirs = best_under(entry["pytriton"], None)
            ours = best_under(entry["server"], theirs["p99_ms"] if theirs else None)
            entry["best"] = {"pytriton": theirs, "server_at_or_under_p99": ours,
                             "server": best_under(entry["server"], None)}
            rounds.append(entry)

    ctx = SimpleNamespace(comparisons=[])
    ceiling_label = f"in-process ORT loop, length-sorted batches of {plan.inprocess_batch}"

    def best(r: dict[str, Any], key: str) -> float:
        return float(r["best"][key]["infer_per_s"]) if r["best"][key] else 0.0

    compare(
        ctx, id="triton/server-vs-pytriton", group="Open Inference Protocol",  # type: ignore[arg-type]
        model=f"{model_name} {variant}", metric="infer/s",
        title="server (OIP front) best throughput at p99 <= PyTriton's / PyTriton best throughput, perf_analyzer",
        a="server, best point at or under PyTriton's p99", b="PyTriton, best point",
        a_values=[best(r, "server_at_or_under_p99") for r in rounds], b_values=[best(r, "pytriton") for r in rounds],
        target=1.5, note="per round; p99 of PyTriton at its best point bounds the server's points",
    )
    compare(
        ctx, id="triton/server-p99-vs-pytriton", group="Open Inference Protocol",  # type: ignore[arg-type]
        model=f"{model_name} {variant}", metric="p99 ms",
        title="server p99 at its best point / PyTriton p99 at its best point",
        a="server, best point", b="PyTriton, best point",
        a_values=[r["best"]["server"]["p99_ms"] for r in rounds], b_values=[r["best"]["pytriton"]["p99_ms"] for r in rounds],
        target=1.0, higher_is_better=False,
    )
    for side, label in (("server", "server (OIP front)"), ("pytriton", "PyTriton")):
        compare(
            ctx, id=f"triton/{side}-vs-inprocess", group="Open Inference Protocol",  # type: ignore[arg-type]
            model=f"{model_name} {variant}", metric="infer/s", title=f"{label} best throughput / {ceiling_label}",
            a=f"{label}, best point", b=ceiling_label, a_values=[best(r, side) for r in rounds],
            b_values=[r["inprocess"]["sequences_per_s"] for r in rounds],
        )
    return {
        "model": model.summary(), "variant": variant, "texts": min(plan.texts, len(texts)),
        "pytriton": {"versions": {p.split("==")[0]: p.split("==")[1] for p in PYTRITON_PINS},
                     "max_batch_size": plan.max_batch_size,
                     "max_queue_delay_us": plan.pytriton_queue_delay_us},
        "rounds": [{**{side: {str(c): p for c, p in r[side].items()} for side in sides},
                    "inprocess": r["inprocess"], "best": r["best"]} for r in rounds],
        "points": {side: {str(c): median_point([r[side][c] for r in rounds]) for c in plan.concurrency}
                   for side in sides},
        "comparisons": ctx.comparisons,
    }


def run(args: Any, info: dict[str, Any]) -> dict[str, Any]:
    """`python -m bench triton`: the figures under `results["triton"]`, and the comparisons."""
    from bench.data import load_texts
    from bench.suite import plan_of

    # CPU only: PyTriton's venv holds onnxruntime's CPU build.
    plan = plan_of(args, TRITON_QUICK, TRITON_FULL, "triton")
    repository = args.models or (models.quick_repository(args.rebuild_models) if args.quick
                                 else models.demo_repository(None, args.rebuild_models))
    texts = load_texts(args.data, count=plan.texts)
    threads = args.threads or info["cpus_usable"]
    figures = bench_triton(repository, texts.sentences, plan, threads, args.variant)
    figures["repository"] = str(repository)
    comparisons = figures.pop("comparisons")
    return {"plan": asdict(plan), "triton": figures, "comparisons": comparisons,
            "settings": {"device": "cpu", "variant": args.variant, "intra_op_threads": threads,
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "texts": f"{figures['texts']} texts: {texts.source}", "notes": [NOTE]}


# ------------------------------------------------------------------------------------------------- Markdown


def markdown_tables(t: dict[str, Any]) -> list[str]:
    from bench.report import _f, _table

    model = t["model"]
    lines = [(f"## Classification through perf_analyzer: {model['name']} {t['variant']} ({model.get('model_type')}, "
             f"{model.get('num_layers')} layers, hidden {model.get('hidden_size')})"), "",
             f"perf_analyzer cycles through {t['texts']} texts. Medians of the rounds:", ""]
    rows = []
    for side, label in (("server", "server (OIP)"), ("pytriton", "PyTriton")):
        for c, p in t["points"][side].items():
            rows.append([label, c, p["infer_per_s"], p["p50_ms"], p["p99_ms"], p["server_queue_ms"],
                         p["server_compute_ms"], p["load_average"]])
    lines += _table(["side", "concurrency", "infer/s", "p50 ms", "p99 ms", "server queue ms", "server compute ms",
                     "load average"], rows)
    lines += ["Best points per round (the server's: at or under PyTriton's p99 at its best):", ""]
    lines += _table(["round", "PyTriton best", "server best at <= that p99", "server best", "in-process loop/s"],
                    [[i + 1, _best(r["best"]["pytriton"]), _best(r["best"]["server_at_or_under_p99"]),
                      _best(r["best"]["server"]), _f(r["inprocess"]["sequences_per_s"])]
                     for i, r in enumerate(t["rounds"])])
    return lines


def _best(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    return f"{p['infer_per_s']:.0f}/s at concurrency {p['concurrency']} (p99 {p['p99_ms']:.1f} ms)"


def markdown(results: dict[str, Any]) -> str:
    from bench import report

    head = report.markdown(results)
    return "\n".join([head.rstrip("\n"), "", *markdown_tables(results["triton"])])


def summary_lines(t: dict[str, Any]) -> list[str]:
    last = t["rounds"][-1]["best"]
    return [(f"triton: PyTriton best {_best(last['pytriton'])}; server {_best(last['server_at_or_under_p99'])} "
            "(last round)")]
