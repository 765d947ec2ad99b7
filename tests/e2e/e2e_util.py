"""Helpers of the end-to-end tests: starting the server, reading its metrics."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from server.process import ServerProcess


def start(models: Path, *args: str) -> ServerProcess:
    return ServerProcess(models, args=["--log-level", "DEBUG", *args])


def scrape(srv: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(srv.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_streams_ended(
    srv: ServerProcess, before: dict, method: str, count: int, model: str = "docgpt", timeout: float = 60.0
) -> tuple[dict[str, float], dict]:
    """Waits until the server counted `count` more `method` requests of `model` as CANCELLED or OK since
    `before` and holds no active sequence of it (a deadline bounds a server that never does); returns how
    many ended each way, and the last scrape."""

    def ended(samples: dict, code: str) -> float:
        return sample(samples, "nlpserve_requests_total", model=model, method=method, code=code)

    deadline = time.monotonic() + timeout
    while True:
        after = scrape(srv)
        counted = {code: ended(after, code) - ended(before, code) for code in ("CANCELLED", "OK")}
        if sum(counted.values()) == count and sample(after, "nlpserve_active_sequences", model=model) == 0:
            return counted, after
        assert time.monotonic() < deadline, f"not all {count} counted, or the sequences kept: {counted}"
        time.sleep(0.01)
