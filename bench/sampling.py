"""`python -m bench.sampling`: time per decode step of sampling, the row-by-row float64 sampler of commit
f214b56 (copied below, verbatim but renamed, as the baseline) against today's batched one.

Both sides sample the same logits with samplers of the same seeds, in the same process, in alternating rounds;
each figure is the median time of one `sample_batch` call over all rounds, and the ratio old/new is the median
of the per-round ratios (of each round's median). The logits are synthetic, sigma * N(0, 1) per token,
float32: sigma 4 gives a nucleus (top-p 0.95, temperature 1) of about 1,100 tokens, sigma 5 one of about 70.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterable, Sequence

import numpy as np

from server.generation.sampling import Sampler, sample_batch
from server.types import SamplingParams

from .machine import cpu_model
from .stats import ratio_of_rounds

# -- the baseline: server/generation/sampling.py at commit f214b56 -------------------------------------------


class OldSampler:
    """The sampling state of one sequence: its parameters, its random generator, the tokens seen so far."""

    __slots__ = ("_seen", "_seen_array", "params", "rng", "simple_greedy")

    def __init__(self, params: SamplingParams, seed: int, prompt_ids: Iterable[int] = ()) -> None:
        self.params = params
        self.rng = np.random.default_rng(seed)
        # Only the repetition penalty needs the history; keep it as a set of distinct ids.
        self._seen: set[int] | None = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self._seen_array: np.ndarray | None = None
        # Greedy with nothing to apply per row: a batch of these is one vectorised argmax.
        self.simple_greedy = params.greedy and self._seen is None

    def observe(self, token: int) -> None:
        if self._seen is not None and token not in self._seen:
            self._seen.add(token)
            self._seen_array = None

    def sample(self, logits: np.ndarray) -> int:
        """Picks the next token from one row of logits (vocab,)."""
        p = self.params
        x = logits.astype(np.float64)  # a copy: the caller's row stays the model's distribution
        if self._seen:
            if self._seen_array is None:
                self._seen_array = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            idx = self._seen_array
            v = x[idx]
            # CTRL (Keskar et al. 2019): push seen tokens' logits towards "less likely" whatever their sign.
            x[idx] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(x))
        x /= p.temperature
        if 0 < p.top_k < x.shape[0]:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x[x < kth] = -np.inf
        x -= x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = old_nucleus(probs, p.top_p)
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept
        cdf = np.cumsum(probs)
        token = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return min(token, probs.shape[0] - 1)


# Top-p looks at this many of the most likely tokens first; only a nucleus wider than that sorts the vocabulary.
OLD_NUCLEUS_CANDIDATES = 256


def old_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most likely tokens whose probabilities reach `top_p` (ties by lower index),
    the set a stable sort of the whole vocabulary gives, without sorting the whole vocabulary (5 to 7 ms per
    row at 50k tokens) when the nucleus lies among the OLD_NUCLEUS_CANDIDATES most likely."""
    if probs.shape[0] > OLD_NUCLEUS_CANDIDATES:
        part = np.argpartition(-probs, OLD_NUCLEUS_CANDIDATES - 1)[:OLD_NUCLEUS_CANDIDATES]
        order = part[np.lexsort((part, -probs[part]))]  # by probability, then by index, like a stable sort
        cumulative = np.cumsum(probs[order])
        count = int(np.searchsorted(cumulative, top_p)) + 1
        # Exact only if the set ends inside the candidates and no token left out ties with its last member.
        if count < OLD_NUCLEUS_CANDIDATES and probs[order[count - 1]] > probs[order[-1]]:
            return order[:count]
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    return order[: int(np.searchsorted(cumulative, top_p)) + 1]


def old_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def old_sample_batch(
    logits: np.ndarray, samplers: Sequence[OldSampler], want_logprobs: Sequence[bool]
) -> tuple[list[int], list[float | None]]:
    """Next token of every row of `logits` (B, vocab), and its log-probability where asked for.

    Rows of plain greedy requests are decided together by one argmax; the others row by row.
    """
    greedy_rows = [i for i, s in enumerate(samplers) if s.simple_greedy]
    if len(greedy_rows) == len(samplers):
        tokens = np.argmax(logits, axis=-1).tolist()
    else:
        tokens = [0] * len(samplers)
        if greedy_rows:
            for i, t in zip(greedy_rows, np.argmax(logits[greedy_rows], axis=-1).tolist()):
                tokens[i] = t
        for i, s in enumerate(samplers):
            if not s.simple_greedy:
                tokens[i] = s.sample(logits[i])
    logprobs: list[float | None] = [None] * len(samplers)
    rows = [i for i, w in enumerate(want_logprobs) if w]
    if rows:
        lp = old_log_softmax(logits[rows])
        for j, i in enumerate(rows):
            logprobs[i] = float(lp[j, tokens[i]])
    for s, t in zip(samplers, tokens):
        if s._seen is not None:
            s.observe(t)
    return tokens, logprobs


# -- the benchmark -------------------------------------------------------------------------------------------

VOCAB = 50_257
SEEN = 1_000  # ids the repetition penalty applies to (prompt and output)
MIXED = "mixed: one row of each above, in turn"

# name: (parameters, sigma of the logits, repetition penalty history)
CASES: dict[str, tuple[SamplingParams, float, bool]] = {
    "greedy": (SamplingParams(), 4.0, False),
    "temperature 0.8": (SamplingParams(temperature=0.8), 4.0, False),
    "top-k 50 + top-p 0.95 + temperature 0.8": (
        SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
        4.0,
        False,
    ),
    "top-p 0.95 (nucleus ~70)": (SamplingParams(temperature=1.0, top_p=0.95), 5.0, False),
    "top-p 0.95 (nucleus ~1,100)": (SamplingParams(temperature=1.0, top_p=0.95), 4.0, False),
    "top-k 50 + top-p 0.95 + temperature 0.8 + repetition penalty 1.2 (1,000 seen)": (
        SamplingParams(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2),
        4.0,
        True,
    ),
    "greedy + repetition penalty 1.2 (1,000 seen)": (SamplingParams(repetition_penalty=1.2), 4.0, True),
}


def _logits(rows: int, sigmas: Sequence[float], seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    return (r.standard_normal((rows, VOCAB)) * np.asarray(sigmas)[:, None]).astype(np.float32)


def _setup(name: str, rows: int, sampler: type) -> tuple[list, list[np.ndarray]]:
    """The samplers of one side and a few steps of logits, the same for both sides."""
    names = list(CASES) if name == MIXED else [name]
    cases = [CASES[names[i % len(names)]] for i in range(rows)]
    seen = np.random.default_rng(1).choice(VOCAB, SEEN, replace=False).tolist()
    samplers = [
        sampler(params, seed=i, prompt_ids=seen if penalised else ())
        for i, (params, _, penalised) in enumerate(cases)
    ]
    steps = [_logits(rows, [sigma for _, sigma, _ in cases], seed) for seed in range(4)]
    return samplers, steps


def _time(batch_fn, samplers: list, steps: list[np.ndarray], calls: int, start: int) -> list[float]:
    out = []
    for c in range(calls):
        logits = steps[(start + c) % len(steps)]
        t0 = time.perf_counter()
        batch_fn(logits, samplers, [False] * len(samplers))
        out.append(time.perf_counter() - t0)
    return out


def measure(name: str, rows: int, rounds: int, seconds: float) -> dict:
    old_samplers, steps = _setup(name, rows, OldSampler)
    new_samplers, _ = _setup(name, rows, Sampler)
    # One call of each to warm up and to size the rounds (about `seconds` of the slower side per round).
    slow = max(
        _time(old_sample_batch, old_samplers, steps, 1, 0)[0],
        _time(sample_batch, new_samplers, steps, 1, 0)[0],
    )
    calls = max(2, min(200, round(seconds / slow)))
    old: list[float] = []
    new: list[float] = []
    old_rounds, new_rounds = [], []
    for r in range(rounds):
        a = _time(old_sample_batch, old_samplers, steps, calls, r)
        b = _time(sample_batch, new_samplers, steps, calls, r)
        old += a
        new += b
        old_rounds.append(statistics.median(a))
        new_rounds.append(statistics.median(b))
    return {
        "case": name,
        "rows": rows,
        "old_ms": 1000 * statistics.median(old),
        "new_ms": 1000 * statistics.median(new),
        "ratio": ratio_of_rounds(old_rounds, new_rounds)["ratio"],
        "calls": calls * rounds,
        "load": os.getloadavg()[0],
    }


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.2, help="per side and round (default 0.2)")
    parser.add_argument("--case", action="append", choices=[*CASES, MIXED], help="default: all")
    args = parser.parse_args(None if argv is None else list(argv))
    load = os.getloadavg()
    cpus = len(os.sched_getaffinity(0))
    print(f"{cpu_model()}, {cpus} CPUs usable; numpy {np.__version__}; vocabulary {VOCAB:,}")
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| case | rows | old ms/step | new ms/step | old/new | load (1 min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.case or [*CASES, MIXED]:
        for rows in args.rows:
            if name == MIXED and rows < len(CASES):
                continue  # not a mix
            m = measure(name, rows, args.rounds, args.seconds)
            old, new = f"{m['old_ms']:.3g}", f"{m['new_ms']:.3g}"
            print(f"| {name} | {rows} | {old} | {new} | {m['ratio']:.1f}x | {m['load']:.2f} |", flush=True)
    load = os.getloadavg()
    print(f"\nload average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
