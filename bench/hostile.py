"""Hostile input: `python -m bench hostile [--quick]`. What a stream of the largest requests a client may send
does to everyone else, and to the server's memory, on the current server and on the one before the hostile-input
fixes (commit c01301d, from a temporary git worktree), one after the other in the same run, with the same models.

One server per side (the real `python -m server`, serving the demo classifier and a generator). Victims, a few
closed-loop clients in this process (each on its own connection), send small Classify and ListModels calls the
whole time. Each phase is

- quiet: the victims alone;
- hostile: the same victims while other clients, in a separate process (each on its own connection), send a
  closed-loop stream of one kind of large request for a bounded time and count:
  - `classify-max`: one text of 3.9 MB (just under the 4 MB message limit),
  - `generate-max`: a prompt of 3.9 MB,
  - `classify-cut`: as many texts of exactly the classifier's cut length (max_sequence_length x 128 characters:
    the longest text that is tokenized whole) as fit in 3.9 MB, the largest Classify request really tokenized,
  - `generate-cut`: a prompt of exactly the generator's refusal length (context x its longest vocabulary entry,
    in characters: the longest prompt that is tokenized);
- recovery: the victims alone again, a few seconds, to see whether the server's memory comes back.

Reported per side and phase: the victims' p50/p99 in the quiet and the hostile window and their ratio
(hostile/quiet; a victim call counts in the window it was sent in), the hostile requests' own latency and
status codes, and the server's resident memory (VmRSS of /proc/PID/status, sampled every 50 ms): before the
hostile window, its peak, and at the end of the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import multiprocessing
import os
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.data import BUILTIN_SENTENCES
from bench.machine import ROOT
from bench.stats import latency_summary

logger = logging.getLogger(__name__)

clock = time.monotonic  # CLOCK_MONOTONIC: the same clock in this process and in the hostile clients' process

# The last commit before the hostile-input fixes (ce0c965: texts cut and prompts refused before tokenizing).
PREVIOUS = "c01301d"
# The server's default --max-message-bytes is 4 MiB; 3.9 MB of text leaves room for the rest of the message.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
HOSTILE_CHARS = 3_900_000
# The server's default --max-texts-per-request.
MAX_TEXTS_PER_REQUEST = 256
# server/classify.py MAX_CHARS_PER_TOKEN (the current server's cut: max_sequence_length times this).
CHARS_PER_TOKEN_CUT = 128
KINDS = ("classify-max", "generate-max", "classify-cut", "generate-cut")
RSS_INTERVAL_S = 0.05
# Every client of this scenario has a connection of its own, as separate client processes would: gRPC would
# otherwise share one subchannel among channels to the same target.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1),
                  ("grpc.max_send_message_length", -1)]


@dataclass(frozen=True)
class HostilePlan:
    """How much to measure. HOSTILE_QUICK takes about 20 s on 2 cores (the current side only, by default);
    HOSTILE_FULL about 4 minutes with the previous server."""

    name: str
    phases: tuple[tuple[str, ...], ...]  # each phase: the kinds of hostile requests sent together
    warmup_s: float  # victims alone before the first phase, not counted
    quiet_s: float
    hostile_s: float  # no hostile request starts after this; those in flight are waited for (hostile_timeout_s)
    recovery_s: float
    classify_victims: int = 2
    list_victims: int = 1
    think_s: float = 0.01  # a victim's pause between calls: ordinary clients, not a saturating load
    hostile_clients: int = 1  # closed-loop clients per kind
    max_hostile_requests: int = 200  # per kind and phase
    hostile_timeout_s: float = 60.0
    rounds: int = 1  # (for the report's header)


HOSTILE_QUICK = HostilePlan(
    name="hostile-quick", phases=(("classify-max", "generate-max"), ("classify-cut", "generate-cut")),
    warmup_s=0.5, quiet_s=1.5, hostile_s=3.0, recovery_s=2.0, max_hostile_requests=50,
)
HOSTILE_FULL = HostilePlan(
    name="hostile-full", phases=tuple((k,) for k in KINDS),
    warmup_s=1.0, quiet_s=5.0, hostile_s=10.0, recovery_s=5.0,
)


# ------------------------------------------------------------------------------------------ the requests


def filler(chars: int) -> str:
    """English text (ASCII: one byte per character) of exactly `chars` characters."""
    unit = " ".join(s + " ." for s in BUILTIN_SENTENCES) + " "
    return (unit * (chars // len(unit) + 1))[:chars]


@dataclass(frozen=True)
class Limits:
    """What the current server does with long inputs, from the model files (its formulas, not its code)."""

    classifier: str
    generator: str
    classify_cut_chars: int  # a longer text is cut to this before tokenizing
    prompt_max_chars: int  # a longer prompt is refused before tokenizing
    classify_max_sequence_length: int
    generator_context: int
    longest_token_chars: int


def limits(repository: Path, classifier: str, generator: str) -> Limits:
    from tokenizers import Tokenizer

    from bench.inprocess import ModelFiles

    clf = ModelFiles.find(repository, classifier)
    gen = ModelFiles.find(repository, generator)
    vocab = Tokenizer.from_file(str(gen.folder / "tokenizer.json")).get_vocab()
    longest = max(1, max(map(len, vocab), default=1))
    return Limits(
        classifier=classifier, generator=generator,
        classify_cut_chars=int(clf.config["max_sequence_length"]) * CHARS_PER_TOKEN_CUT,
        prompt_max_chars=int(gen.config["max_sequence_length"]) * longest,
        classify_max_sequence_length=int(clf.config["max_sequence_length"]),
        generator_context=int(gen.config["max_sequence_length"]), longest_token_chars=longest,
    )


@dataclass(frozen=True)
class Spec:
    """One kind of hostile request: which RPC, to which model, how many texts of how many characters."""

    kind: str
    method: str  # Classify or Generate
    model: str
    texts: int
    chars: int  # per text (Classify) or the prompt's (Generate)


def hostile_specs(lim: Limits, hostile_chars: int = HOSTILE_CHARS) -> dict[str, Spec]:
    cut_texts = max(1, min(MAX_TEXTS_PER_REQUEST, hostile_chars // (lim.classify_cut_chars + 4)))
    return {
        "classify-max": Spec("classify-max", "Classify", lim.classifier, 1, hostile_chars),
        "generate-max": Spec("generate-max", "Generate", lim.generator, 1, hostile_chars),
        "classify-cut": Spec("classify-cut", "Classify", lim.classifier, cut_texts, lim.classify_cut_chars),
        "generate-cut": Spec("generate-cut", "Generate", lim.generator, 1, lim.prompt_max_chars),
    }


def build_request(spec: Spec) -> Any:
    """The request message (greedy, one new token: the prompt is the work)."""
    from client.proto import inference_pb2 as pb

    if spec.method == "Classify":
        return pb.ClassifyRequest(model=spec.model, texts=[filler(spec.chars)] * spec.texts)
    return pb.GenerateRequest(model=spec.model, prompt=filler(spec.chars),
                              parameters=pb.GenerationParameters(max_new_tokens=1, temperature=0.0))


# ------------------------------------------------------------------------------------ the hostile clients


def _hostile_worker(conn: Any, target: str, clients: int) -> None:
    """The hostile clients' process: sync gRPC, one thread and one connection per client. Commands on `conn`:
    (specs, duration_s, max_requests, timeout_s) -> the records [kind, sent, done, code] of that burst; None
    ends it."""
    import grpc

    channels: dict[tuple[str, int], Any] = {}
    payloads: dict[str, bytes] = {}
    while True:
        command = conn.recv()
        if command is None:
            break
        specs, duration_s, max_requests, timeout_s = command
        for spec in specs:
            if spec.kind not in payloads:
                payloads[spec.kind] = build_request(spec).SerializeToString()
            for index in range(clients):
                if (spec.kind, index) not in channels:
                    channels[spec.kind, index] = grpc.insecure_channel(target, options=OWN_CONNECTION)
        conn.send(_burst(channels, payloads, specs, clients, clock() + duration_s, max_requests, timeout_s))
    for channel in channels.values():
        channel.close()


def _burst(channels: dict[tuple[str, int], Any], payloads: dict[str, bytes], specs: Sequence[Spec], clients: int,
           end: float, max_requests: int, timeout_s: float) -> list[list[Any]]:
    """`clients` closed-loop clients per kind until `end` or `max_requests` of that kind; every one waited for."""
    import grpc

    records: list[list[Any]] = []
    lock = threading.Lock()
    sent: Counter[str] = Counter()

    def client(spec: Spec, index: int) -> None:
        # pre-serialized bytes, no serializer: the client's own cost per request is one copy
        call = channels[spec.kind, index].unary_unary(f"/nlpserve.v1.InferenceService/{spec.method}")
        while clock() < end:
            with lock:
                if sent[spec.kind] >= max_requests:
                    return
                sent[spec.kind] += 1
            t0 = clock()
            try:
                call(payloads[spec.kind], timeout=timeout_s)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                records.append([spec.kind, t0, clock(), code])

    threads = [threading.Thread(target=client, args=(s, i)) for s in specs for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


class HostileClients:
    """The hostile clients' process (spawned before the first phase, so that its start costs no window)."""

    def __init__(self, target: str, clients: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_hostile_worker, args=(child, target, clients), daemon=True)
        self.process.start()

    def burst(self, specs: Sequence[Spec], duration_s: float, max_requests: int, timeout_s: float) -> list[list[Any]]:
        try:
            self.conn.send((list(specs), duration_s, max_requests, timeout_s))
            return self.conn.recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"the hostile clients' process ended (exit code {self.process.exitcode}): {e}") from e

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ----------------------------------------------------------------------------------------- memory


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process in kB (None once it is gone)."""
    try:
        return parse_status_kb(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
    except OSError:
        return None


def parse_status_kb(text: str, key: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread: [(monotonic time, kB)]."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL_S) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            kb = rss_kb(self.pid)
            if kb is not None:
                self.samples.append((clock(), kb))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def rss_between(samples: Sequence[tuple[float, int]], start: float, end: float) -> dict[str, float | None]:
    """MB: the last sample at or before `start`, the peak and the least in [start, end], the last at or before
    `end`."""
    inside = [kb for t, kb in samples if start <= t <= end]
    before = [kb for t, kb in samples if t <= start]
    upto = [kb for t, kb in samples if t <= end]

    def mb(kb: int | None) -> float | None:
        return None if kb is None else round(kb / 1024, 1)

    return {"at_start": mb(before[-1] if before else (inside[0] if inside else None)),
            "peak": mb(max(inside) if inside else None), "least": mb(min(inside) if inside else None),
            "at_end": mb(upto[-1] if upto else None)}


# ----------------------------------------------------------------------------------------- figures


def victims_in(records: Sequence[tuple[str, float, float, str]], start: float, end: float) -> dict[str, Any]:
    """The victims' calls sent in [start, end): latency per method (of the OK ones) and status codes."""
    out: dict[str, Any] = {}
    for method in sorted({r[0] for r in records}):
        mine = [r for r in records if r[0] == method and start <= r[1] < end]
        out[method] = {"latency_ms": latency_summary([r[2] - r[1] for r in mine if r[3] == "OK"]),
                       "codes": dict(Counter(r[3] for r in mine))}
    return out


def hostile_summary(records: Sequence[Sequence[Any]], specs: dict[str, Spec]) -> dict[str, Any]:
    """Per kind: how many were sent, their status codes and latency (every code: a refusal is an answer)."""
    out: dict[str, Any] = {}
    for kind in sorted({r[0] for r in records}):
        mine = [r for r in records if r[0] == kind]
        spec = specs[kind]
        out[kind] = {"requests": len(mine), "codes": dict(Counter(r[3] for r in mine)),
                     "latency_ms": latency_summary([r[2] - r[1] for r in mine]),
                     "texts": spec.texts, "chars": spec.chars, "megabytes": round(spec.texts * spec.chars / 1e6, 2)}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b and b > 0 else None


def phase_ratios(phase: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """hostile/quiet of each victim method's p50 and p99."""
    out = {}
    for method, quiet in phase["quiet"]["victims"].items():
        hostile = phase["hostile"]["victims"].get(method)
        if hostile is None:
            continue
        out[method] = {q: ratio(hostile["latency_ms"][q], quiet["latency_ms"][q]) for q in ("p50", "p99")}
    return out


def series(samples: Sequence[tuple[float, int]], records: Sequence[tuple[str, float, float, str]], t0: float,
           bin_s: float = 0.25) -> dict[str, list[list[float]]]:
    """For the plot: RSS in MB every 0.1 s, and the slowest victim call (by the time it was sent) per bin."""
    rss, last = [], -1.0
    for t, kb in samples:
        if t - last >= 0.1:
            rss.append([round(t - t0, 2), round(kb / 1024, 1)])
            last = t
    slowest: dict[int, float] = {}
    for _, sent, done, _code in records:
        b = int((sent - t0) / bin_s)
        slowest[b] = max(slowest.get(b, 0.0), done - sent)
    return {"rss_mb": rss, "victim_max_ms": [[round(b * bin_s, 2), round(v * 1000, 2)] for b, v in sorted(slowest.items())]}


# --------------------------------------------------------------------------------------------- a side


async def _victims_run(target: str, classifier: str, plan: HostilePlan, control: Any) -> list[tuple[str, float, float, str]]:
    """Runs the victims until `control` (a coroutine running the phases) returns; the victims' records."""
    import grpc

    from client.proto import inference_pb2 as pb
    from client.proto import inference_pb2_grpc as pb_grpc

    records: list[tuple[str, float, float, str]] = []
    stop = asyncio.Event()
    sentences = list(BUILTIN_SENTENCES)
    channels = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
                for _ in range(plan.classify_victims + plan.list_victims)]
    try:
        for channel in channels:
            await channel.channel_ready()

        async def victim(index: int, channel: Any) -> None:
            stub = pb_grpc.InferenceServiceStub(channel)
            listing = index >= plan.classify_victims
            method = "ListModels" if listing else "Classify"
            k = index
            while not stop.is_set():
                request = (pb.ListModelsRequest() if listing
                           else pb.ClassifyRequest(model=classifier, texts=[sentences[k % len(sentences)]]))
                k += 1
                t0 = clock()
                try:
                    await (stub.ListModels(request, timeout=120) if listing else stub.Classify(request, timeout=120))
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                records.append((method, t0, clock(), code))
                await asyncio.sleep(plan.think_s)

        tasks = [asyncio.create_task(victim(i, c)) for i, c in enumerate(channels)]
        try:
            await control
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close()
    return records


def run_side(label: str, server: Any, plan: HostilePlan, specs: dict[str, Spec], lim: Limits) -> dict[str, Any]:
    """The phases on one running server: victims throughout, a burst of hostile requests in each phase."""
    from bench.load import cpu_seconds

    pid = int(server.pid)
    sampler = RssSampler(pid)
    hostile = HostileClients(server.target, plan.hostile_clients)
    phases: list[dict[str, Any]] = []
    windows: list[list[Any]] = []
    t_start = clock()

    def mark() -> dict[str, Any]:
        return {"t": clock(), "cpu": cpu_seconds(pid), "load": os.getloadavg()[0]}

    async def control() -> None:
        await asyncio.sleep(plan.warmup_s)
        for kinds in plan.phases:
            name = "+".join(kinds)
            logger.info("%s: %s: quiet %.0f s, hostile %.0f s, recovery %.0f s", label, name, plan.quiet_s,
                        plan.hostile_s, plan.recovery_s)
            q = mark()
            await asyncio.sleep(plan.quiet_s)
            h = mark()
            burst = await asyncio.to_thread(hostile.burst, [specs[k] for k in kinds], plan.hostile_s,
                                            plan.max_hostile_requests, plan.hostile_timeout_s)
            r = mark()
            await asyncio.sleep(plan.recovery_s)
            e = mark()
            phases.append({"name": name, "kinds": list(kinds), "marks": [q, h, r, e], "burst": burst})

    try:
        records = asyncio.run(_victims_run(server.target, lim.classifier, plan, control()))
    finally:
        hostile.close()
        samples = sampler.stop()
    t_end = clock()

    def window(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        seconds = b["t"] - a["t"]
        cpu = (round(100 * (b["cpu"] - a["cpu"]) / seconds, 1)
               if a["cpu"] is not None and b["cpu"] is not None and seconds > 0 else None)
        return {"seconds": round(seconds, 2), "victims": victims_in(records, a["t"], b["t"]),
                "server_cpu_percent": cpu, "load_average": round(a["load"], 2)}

    out_phases = []
    for p in phases:
        q, h, r, e = p["marks"]
        entry = {
            "name": p["name"], "kinds": p["kinds"],
            "quiet": window(q, h), "hostile": window(h, r), "recovery": window(r, e),
            "hostile_requests": hostile_summary(p["burst"], specs),
            "rss_mb": {"before": rss_between(samples, q["t"], h["t"])["at_end"],
                       "peak": rss_between(samples, h["t"], e["t"])["peak"],
                       "after": rss_between(samples, r["t"], e["t"])["at_end"],
                       "least_in_recovery": rss_between(samples, r["t"], e["t"])["least"]},
        }
        entry["ratios"] = phase_ratios(entry)
        out_phases.append(entry)
        windows.append([p["name"], round(h["t"] - t_start, 2), round(r["t"] - t_start, 2)])
    whole = rss_between(samples, t_start, t_end)
    first = phases[0]["marks"][1]["t"] if phases else t_start
    return {
        "label": label,
        "phases": out_phases,
        "rss_mb": {"after_startup": whole["at_start"] if samples else None,
                   "before_first_hostile": rss_between(samples, t_start, first)["at_end"],
                   "peak": whole["peak"], "at_end": whole["at_end"],
                   "hwm": _hwm_mb(pid)},
        "series": {**series(samples, records, t_start), "hostile_windows": windows},
        "duration_s": round(t_end - t_start, 1),
    }


def _hwm_mb(pid: int) -> float | None:
    try:
        kb = parse_status_kb(Path(f"/proc/{pid}/status").read_text(), "VmHWM")
    except OSError:
        return None
    return None if kb is None else round(kb / 1024, 1)


# -------------------------------------------------------------------------------------- the two servers


def linked_repository(repository: Path, names: Sequence[str], work: Path) -> Path:
    """A repository of links to the models served (nothing else is loaded)."""
    folder = work / "repo"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = folder / name
        if not link.exists():
            link.symlink_to((repository / name).resolve(), target_is_directory=True)
    return folder


def server_process_class(tree: Path) -> Any:
    """`ServerProcess` of the source tree `tree` (its module loaded from that tree, so that it starts that
    tree's `python -m server` with that tree as the working directory)."""
    if tree.resolve() == ROOT.resolve():
        from server.process import ServerProcess

        return ServerProcess
    path = tree / "server" / "process.py"
    if not path.is_file():
        raise FileNotFoundError(f"{tree}: no server/process.py")
    spec = importlib.util.spec_from_file_location(f"_nlpserve_process_{abs(hash(str(tree)))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ServerProcess


@contextlib.contextmanager
def previous_tree(rev: str, given: Path | None = None) -> Iterator[Path]:
    """A checkout of `rev`: `given` when passed, else a temporary git worktree, removed afterwards."""
    if given is not None:
        yield given
        return
    base = Path(tempfile.mkdtemp(prefix="nlpserve-previous-"))
    tree = base / "tree"
    result = subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git worktree add {rev}: {result.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True, check=False)
        with contextlib.suppress(OSError):
            base.rmdir()


def tree_info(tree: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, check=False).stdout.strip()

    changed = git("status", "--porcelain", "--", "server", "client", "protos")
    return {"tree": str(tree), "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_server_changes": bool(changed)}


def serve_side(label: str, tree: Path, repository: Path, server_args: list[str], env: dict[str, str],
               plan: HostilePlan, specs: dict[str, Spec], lim: Limits) -> dict[str, Any]:
    cls = server_process_class(tree)
    t0 = time.perf_counter()
    with cls(repository, args=server_args, env=env, startup_timeout=300.0) as srv:
        started = round(time.perf_counter() - t0, 1)
        cwd = os.path.realpath(f"/proc/{srv.pid}/cwd")
        if Path(cwd).resolve() != tree.resolve():
            raise RuntimeError(f"{label}: the server runs in {cwd}, not in {tree}")
        logger.info("%s server (%s) ready in %.1f s, pid %d", label, tree, started, srv.pid)
        result = run_side(label, srv, plan, specs, lim)
    return {**tree_info(tree), **result, "startup_s": started}


def bench_hostile(
    repository: Path, plan: HostilePlan, threads: int, device: str, variant: str, classifier: str, generator: str,
    previous: str | None, previous_dir: Path | None, env: dict[str, str],
) -> dict[str, Any]:
    """Both sides, the current server first; their figures, and the comparisons (victims' p99 hostile/quiet)."""
    lim = limits(repository, classifier, generator)
    specs = hostile_specs(lim)
    work = Path(tempfile.mkdtemp(prefix="nlpserve-bench-hostile-"))
    repo = linked_repository(repository, [classifier, generator], work)
    server_args = ["--device", device, "--variant", variant, "--intra-op-threads", str(threads),
                   "--log-level", "WARNING"]
    result: dict[str, Any] = {"limits": asdict(lim), "specs": {k: asdict(s) for k, s in specs.items()},
                              "server_args": server_args, "server_env": env, "sides": {}}
    result["sides"]["current"] = serve_side("current", ROOT, repo, server_args, env, plan, specs, lim)
    if previous:
        with previous_tree(previous, previous_dir) as tree:
            result["sides"]["previous"] = serve_side(f"previous ({previous})", tree, repo, server_args, env, plan,
                                                     specs, lim)
    return result


def comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The victims' p99 hostile/quiet per side, phase and method, in the shape of suite.compare's entries."""
    from bench.suite import compare

    ctx = SimpleNamespace(comparisons=[])
    for side, s in result["sides"].items():
        for phase in s["phases"]:
            for method, quiet in phase["quiet"]["victims"].items():
                hostile = phase["hostile"]["victims"].get(method)
                a, b = (hostile or {}).get("latency_ms", {}).get("p99"), quiet["latency_ms"]["p99"]
                if a is None or b is None:
                    continue
                compare(
                    ctx, id=f"hostile/{side}/{phase['name']}/{method}/p99", group="hostile input",  # type: ignore[arg-type]
                    model=f"{side}: {phase['name']}", metric="victims' p99 ms", higher_is_better=False,
                    title=f"{method} p99 with {phase['name']} requests / quiet", a="hostile window", b="quiet window",
                    a_values=[a], b_values=[b],
                )
    return ctx.comparisons


def run(args: Any, info: dict[str, Any]) -> dict[str, Any]:
    """`python -m bench hostile`: the figures under `results["hostile"]`, the comparisons, the notes."""
    from bench import models

    plan = HOSTILE_QUICK if args.quick else HOSTILE_FULL
    if args.models is not None:
        repository = args.models
    elif args.quick:
        repository = models.quick_repository(args.rebuild_models)
    else:
        repository = models.demo_repository(None, args.rebuild_models)
    generator = args.generator or ("smollm2" if models.has_model(repository, "smollm2") else "docgpt")
    for name in ("sentiment", generator):
        if not models.has_model(repository, name):
            raise FileNotFoundError(f"{repository}: no model {name!r}")
    previous = None if args.no_previous else (args.previous or (None if args.quick else PREVIOUS))
    env = dict(kv.split("=", 1) for kv in args.server_env)
    threads = args.threads or info["cpus_usable"]
    hostile = bench_hostile(repository, plan, threads, args.device, args.variant, "sentiment", generator, previous,
                            args.previous_dir, env)
    hostile["repository"] = str(repository)
    return {"plan": asdict(plan), "hostile": hostile, "comparisons": comparisons(hostile),
            "settings": {"device": args.device, "variant": args.variant, "intra_op_threads": threads,
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "server_env": env},
            "texts": "built-in sentences (victims); the same sentences repeated into the hostile texts"}
