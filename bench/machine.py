"""What the figures were measured on: CPU, cores, memory, GPU, library versions, load."""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

# The distributions whose versions decide the figures.
LIBRARIES = (
    "onnxruntime-gpu",
    "onnxruntime",
    "numpy",
    "tokenizers",
    "torch",
    "transformers",
    "grpcio",
    "protobuf",
    "prometheus-client",
    "matplotlib",
    "py-spy",
    "nlpserve",
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpus() -> list[dict[str, str]]:
    """The NVIDIA GPUs nvidia-smi reports; empty when there is none (or no driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        name, memory, driver = (part.strip() for part in line.split(",", 2))
        found.append({"name": name, "memory": memory, "driver": driver})
    return found


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return []


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """Everything about this machine that a reader needs to weigh the absolute figures."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gib": memory_gib(),
        "gpus": gpus(),
        "onnxruntime_providers": onnxruntime_providers(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "git_commit": git_commit(),
        "load_average_at_start": list(os.getloadavg()),
    }


def machine_slug(info: dict[str, Any]) -> str:
    """A short file-name-safe name: CPU model, cores and the GPU if any, e.g. `amd-epyc-2cpu`."""
    name = f"{info['cpu_model']}-{info['cpus_usable']}cpu"
    if info["gpus"]:
        name += "-" + info["gpus"][0]["name"]
    name = re.sub(r"\((r|tm)\)|cpu @.*?(?=-\d+cpu)|processor|\d+-core", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
