"""Where a loaded server spends its time outside ONNX Runtime: py-spy samples the server process while the load
generator drives it, and the samples are summed by function and by package."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# A frame of py-spy's raw (collapsed) output: "function (path/to/file.py:line)".
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    """py-spy from the virtualenv next to this interpreter, else from PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start_recording(
    pid: int, seconds: float, output: Path, rate: int = 100, native: bool = False
) -> subprocess.Popen[bytes]:
    """Starts py-spy on `pid` for `seconds`, samples summed per function (--function), not per line.

    By default --nonblocking: the server runs undisturbed. `native` also records C/C++ frames, but py-spy must
    then pause the process for every sample (throughput fell about fivefold here) and counts threads blocked in
    epoll/futex as busy, so it is off: C work shows under the Python frame that called it (gRPC's Cython core
    under asyncio's `Handle._run`, ONNX Runtime under `InferenceSession.run`)."""
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (pip install -e '.[bench]')")
    command = [
        exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
        "--format", "raw", "--function", "--output", str(output), "--native" if native else "--nonblocking",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_recording(process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"py-spy failed ({process.returncode}): {out.decode(errors='replace')[-500:]}")


def _parse_frame(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    return match["function"], match["file"]


def package_of(file: str) -> str:
    """A short name for where a file lives: `server/batching.py`, `grpc`, `asyncio`, `numpy`..."""
    path = file.replace("\\", "/")
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    for own in ("server/", "client/", "export/", "bench/"):
        if f"/{own}" in f"/{path}":
            return own + path.split(own, 1)[1]
    if "/python3." in path:
        rest = path.split("/python3.", 1)[1].split("/", 1)
        return rest[1].split("/", 1)[0].removesuffix(".py") if len(rest) > 1 else path
    return path


# Leaf frames of a thread that waits rather than works. py-spy skips threads the kernel reports as sleeping, but a
# thread sampled as it enters or leaves a wait still lands here; they are counted apart from the costs.
WAITING = {
    ("select", "selectors.py"),
    ("EpollSelector.select", "selectors.py"),
    ("_PollLikeSelector.select", "selectors.py"),
    ("PollSelector.select", "selectors.py"),
    ("_worker", "concurrent/futures/thread.py"),
    ("Thread.run", "threading.py"),
    ("Condition.wait", "threading.py"),
    ("Event.wait", "threading.py"),
    ("Thread._wait_for_tstate_lock", "threading.py"),
}


def _is_waiting(function: str, file: str) -> bool:
    return any(function == f and file.endswith(suffix) for f, suffix in WAITING)


def summarize(raw: str, top: int = 15) -> dict[str, Any]:
    """Sums py-spy's raw samples: the share inside ONNX Runtime (a stack that reaches onnxruntime's `run`), the
    share waiting (WAITING leaves), and for the rest, the top functions by self time (the leaf frame: C code
    called from Python counts to its caller) and by total time (anywhere on the stack), and self time by package.
    Shares are of all samples py-spy took (threads it saw busy)."""
    total = 0
    in_ort = 0
    waiting = 0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [_parse_frame(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        if any("onnxruntime" in file for _, file in frames):
            in_ort += count
            continue
        if _is_waiting(*frames[-1]):
            waiting += count
            continue
        names = [f"{function} ({package_of(file)})" for function, file in frames]
        self_time[names[-1]] += count
        by_package[package_of(frames[-1][1])] += count
        for name in set(names):
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"name": k, "percent": round(100.0 * v / total, 1)} for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "onnxruntime_percent": round(100.0 * in_ort / total, 1) if total else None,
        "waiting_percent": round(100.0 * waiting / total, 1) if total else None,
        "outside_onnxruntime_percent": round(100.0 * (total - in_ort - waiting) / total, 1) if total else None,
        "top_self": share(self_time) if total else [],
        "top_total": share(inclusive) if total else [],
        "by_package": share(by_package) if total else [],
    }
