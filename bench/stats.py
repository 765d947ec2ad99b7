"""Small statistics helpers: percentiles in milliseconds, and the ratio of two sides measured in rounds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np


def latency_summary(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/mean/max of latencies given in seconds, in milliseconds (None when there are none)."""
    if not seconds:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "count": int(ms.size),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(ms.mean()), 3),
        "max": round(float(ms.max()), 3),
    }


def ratio_of_rounds(a: Sequence[float], b: Sequence[float]) -> dict[str, float | list[float] | None]:
    """The ratio a/b of two sides measured in alternating rounds.

    `ratio` is the median of the per-round ratios: each round's two sides ran back to back, so a burst of noise
    from the shared machine spoils one round, not the figure; `pooled` is mean(a)/mean(b), for reference.
    """
    rounds = [x / y for x, y in zip(a, b, strict=True) if y > 0]
    if not rounds:
        return {"ratio": None, "pooled": None, "rounds": []}
    return {
        "ratio": round(statistics.median(rounds), 4),
        "pooled": round(statistics.fmean(a) / statistics.fmean(b), 4) if statistics.fmean(b) > 0 else None,
        "rounds": [round(r, 4) for r in rounds],
    }
