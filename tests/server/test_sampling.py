"""Sampling: greedy, temperature, top-k, top-p, repetition penalty; seeded per request, batch-independent.

The batched sampler is checked against `reference`, the target distribution computed row by row the obvious
way: exactly for greedy and top-k 1; with evenly spaced draws (a stand-in generator) over 1,000 random cases,
where the count of each token must be its probability times the number of draws, to within one; and with
seeded draws, by a total-variation bound.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest

from server.generation.sampling import (
    NUCLEUS_CANDIDATES,
    Sampler,
    _ranked,
    _sample,
    log_softmax,
    sample_batch,
)
from server.types import GREEDY_BELOW, SamplingParams

rng = np.random.default_rng(0)
LOGITS = rng.normal(size=(6, 50)).astype(np.float32)


def draw(params: SamplingParams, seed: int, row: np.ndarray, n: int = 20) -> list[int]:
    s = Sampler(params, seed)
    return [s.sample(row) for _ in range(n)]


def reference(
    logits: np.ndarray, p: SamplingParams, seen=(), slack: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The target distribution of one row (tokens, probabilities), in float64: the penalty, softmax(x / T)
    over the top_k most likely (a stable sort: ties by lower id), then the smallest set reaching top_p (top_p
    scaled by 1 + slack), renormalised; greedy and top_k 1 are the argmax alone."""
    x = logits.astype(np.float64)
    if p.repetition_penalty != 1.0:
        idx = np.array(sorted({i for i in seen if i < len(x)}), dtype=np.int64)
        v = x[idx]
        x[idx] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if p.greedy or p.top_k == 1:
        return np.array([np.argmax(x)]), np.array([1.0])
    order = np.argsort(-x, kind="stable")
    if 0 < p.top_k < len(x):
        order = order[: p.top_k]
    z = x[order] / p.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        count = min(len(probs), int(np.searchsorted(np.cumsum(probs), p.top_p * (1 + slack))) + 1)
        order, probs = order[:count], probs[:count] / probs[:count].sum()
    return order, probs


class Evenly:
    """A stand-in for a sequence's generator: its one draw is the given u."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


def evenly_spaced_tokens(row: np.ndarray, p: SamplingParams, seen, draws: int) -> np.ndarray:
    """The tokens of `draws` rows of `row` in one batch, drawn at u = (j + 1/2) / draws (nothing recorded)."""
    one = Sampler(p, seed=0, prompt_ids=seen)
    samplers = []
    for j in range(draws):
        s = copy.copy(one)
        s.rng = Evenly((j + 0.5) / draws)
        samplers.append(s)
    return np.array(_sample(np.repeat(row[None], draws, axis=0), samplers))


# -- the distribution, case by case --------------------------------------------------------------------------


def random_logits(r: np.random.Generator, vocab: int) -> np.ndarray:
    kind = r.integers(5)
    if kind == 0:
        x = r.normal(size=vocab) * r.choice([0.1, 1.0, 3.0, 10.0])
    elif kind == 1:
        x = r.integers(-3, 4, size=vocab).astype(np.float64)  # ties everywhere
    elif kind == 2:
        x = r.standard_cauchy(vocab)  # heavy tails
    elif kind == 3:
        x = np.zeros(vocab)  # a single tie
    else:
        x = np.round(r.normal(size=vocab), 1) * 2
    x[r.random(vocab) < r.choice([0.0, 0.1, 0.9])] = -np.inf
    if np.isinf(x).all():
        x[r.integers(vocab)] = 0.0
    return x.astype(np.float32)


def random_params(r: np.random.Generator, vocab: int) -> SamplingParams:
    temperature = r.choice([0.0, GREEDY_BELOW / 2, GREEDY_BELOW, 1e-3, 0.3, 0.7, 1.0, 1.0, 1.5, 3.0, 100.0])
    top_k = int(
        r.choice([0, 0, 1, 2, 5, 50, max(1, vocab - 1), vocab, vocab + 5, int(r.integers(1, vocab + 1))])
    )
    top_p = float(r.choice([1.0, 1.0, 1 - 1e-12, 0.999, 0.95, 0.9, 0.5, 0.25, 1e-9, r.uniform(0.01, 1.0)]))
    penalty = float(r.choice([1.0, 1.0, 1.3, 2.0, 0.7]))
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)


def test_against_the_reference_on_1000_random_cases():
    r = np.random.default_rng(2024)
    vocabs = [1, 2, 3, 7, 64, 65, 100, 257, 300, 1000, 3000, 50_257]
    weights = np.array([1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 1, 0.5])
    compared = exact = 0
    for case in range(1000):
        vocab = int(r.choice(vocabs, p=weights / weights.sum()))
        row = random_logits(r, vocab)
        p = random_params(r, vocab)
        # Seen ids may repeat, and lie past the sampled vocabulary (ids a tokenizer adds): those are ignored.
        seen = r.integers(0, vocab + 3, size=int(r.integers(0, min(2 * vocab, 400) + 1))).tolist()
        draws = 16 if vocab > 5000 else 32 if vocab > 1000 else 64
        tokens = evenly_spaced_tokens(row, p, seen, draws)
        support, probs = reference(row, p, seen)
        if p.greedy or p.top_k == 1:
            assert (tokens == support[0]).all(), (case, p)
            exact += 1
            continue
        # A nucleus whose edge lies within rounding of top_p may keep one token more or less.
        wide, _ = reference(row, p, seen, slack=1e-9)
        narrow, _ = reference(row, p, seen, slack=-1e-9)
        assert np.isin(tokens, wide).all(), (case, p)
        if len(wide) != len(narrow):
            continue
        counts = np.zeros(vocab)
        np.add.at(counts, tokens, 1)
        assert np.abs(counts[support] - draws * probs).max() <= 1 + 1e-6 * draws, (case, p)
        compared += 1
    assert exact > 150 and compared > 600  # what the random parameters give with this seed


def total_variation_bound(probs: np.ndarray, n: int, false_failure: float) -> float:
    """TV(empirical, probs) of n draws exceeds this with probability below `false_failure`: E[TV] is at most
    1/2 sum sqrt(p (1 - p) / n) (Jensen), and one draw moves TV by 1/n, so McDiarmid bounds the excess by
    exp(-2 n eps^2)."""
    mean = 0.5 * np.sqrt(probs * (1 - probs) / n).sum()
    return float(mean + math.sqrt(math.log(1 / false_failure) / (2 * n)))


STATISTICAL = [
    (12, SamplingParams(temperature=0.7), 0),
    (20, SamplingParams(temperature=1.3, top_k=5), 1),
    (30, SamplingParams(temperature=1.0, top_p=0.8), 2),
    (25, SamplingParams(temperature=0.9, top_k=10, top_p=0.9, repetition_penalty=1.5), 3),
    (40, SamplingParams(temperature=2.0), 4),
]


@pytest.mark.parametrize(("vocab", "params", "seed"), STATISTICAL)
def test_seeded_frequencies_match_the_target_distribution(vocab, params, seed):
    """2,000 sequences of their own seeds, one batch, 10 draws each (nothing recorded: the distribution
    stays); false failure below 1e-6 per case for a random seed."""
    r = np.random.default_rng(seed)
    row = (r.normal(size=vocab) * 1.5).astype(np.float32)
    row[r.integers(vocab)] = -np.inf
    row[:3] = row[3]  # a tie
    seen = r.integers(0, vocab, size=8).tolist()
    support, probs = reference(row, params, seen)
    narrow, _ = reference(row, params, seen, slack=-1e-6)
    assert len(narrow) == len(support)  # an edge well inside top_p
    sequences, steps = 2_000, 10
    samplers = [Sampler(params, seed=1000 * seed + i, prompt_ids=seen) for i in range(sequences)]
    batch = np.repeat(row[None], sequences, axis=0)
    tokens = np.array([_sample(batch, samplers) for _ in range(steps)]).ravel()
    assert np.isin(tokens, support).all()
    freq = np.bincount(tokens, minlength=vocab)[support] / len(tokens)
    assert 0.5 * np.abs(freq - probs).sum() < total_variation_bound(probs, len(tokens), 1e-6)


def test_the_same_seed_gives_the_same_tokens_the_reference_allows_over_many_steps():
    r = np.random.default_rng(5)
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2)
    steps = (r.normal(size=(30, 1000)) * 3).astype(np.float32)
    runs = []
    for _ in range(2):
        s = Sampler(p, seed=77, prompt_ids=[1, 2, 3])
        seen, tokens = [1, 2, 3], []
        for row in steps:
            t = sample_batch(row[None], [s], [False])[0][0]
            assert t in reference(row, p, seen, slack=1e-9)[0]
            seen.append(t)
            tokens.append(t)
        runs.append(tokens)
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 5


# -- batch invariance ----------------------------------------------------------------------------------------

VOCAB = 50_257

# (parameters, logits kind) of the sequences whose tokens must not depend on the batch.
TRACKED = [
    (SamplingParams(), "normal"),
    (SamplingParams(repetition_penalty=1.3), "normal"),
    (SamplingParams(repetition_penalty=0.8), "normal"),
    (SamplingParams(temperature=0.7), "normal"),
    (SamplingParams(temperature=1.0), "flat"),
    (SamplingParams(temperature=1.0, top_k=1), "ties"),
    (SamplingParams(temperature=0.9, top_k=40), "normal"),
    (SamplingParams(temperature=1.0, top_p=0.9), "peaked"),
    (SamplingParams(temperature=1.0, top_p=0.97), "flat"),  # a nucleus of thousands: several rounds
    (SamplingParams(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2), "normal"),
    (SamplingParams(temperature=1.2, top_k=300, top_p=0.9), "ties"),  # ties at the candidates' edge
    (SamplingParams(temperature=1.0, top_k=100), "masked"),  # -inf ties at the edge
    (SamplingParams(temperature=1.0, top_p=0.99), "masked"),
    (SamplingParams(temperature=1.0, top_k=2_000), "normal"),
    (SamplingParams(temperature=1.5, top_k=20_000, top_p=0.99), "flat"),
]
STEPS = 10


@functools.cache
def step_logits(kind: str, request: int, step: int) -> np.ndarray:
    r = np.random.default_rng(10_000 * request + step)
    if kind == "ties":
        return r.integers(-5, 3, size=VOCAB).astype(np.float32)
    if kind == "masked":
        x = np.full(VOCAB, -np.inf, dtype=np.float32)
        x[r.choice(VOCAB, 60, replace=False)] = r.normal(size=60)
        return x
    scale = {"normal": 3.0, "flat": 0.5, "peaked": 6.0}[kind]
    return (r.normal(size=VOCAB) * scale).astype(np.float32)


def fillers(r: np.random.Generator, count: int) -> list[tuple[Sampler, np.ndarray]]:
    """Neighbours of random kinds, parameters and seeds."""
    out = []
    for _ in range(count):
        params, kind = TRACKED[r.integers(len(TRACKED))]
        out.append(
            (Sampler(params, seed=int(r.integers(1 << 30))), step_logits(kind, 99, int(r.integers(20))))
        )
    return out


def run_batches(arrange) -> list[list[tuple[int, float]]]:
    """Every tracked sequence over STEPS steps; arrange(step, samplers) gives the step's batches, each a list
    of (tracked index or None, sampler, logits row)."""
    samplers = [Sampler(p, seed=100 + i, prompt_ids=range(i, 3000, 7)) for i, (p, _) in enumerate(TRACKED)]
    out: list[list[tuple[int, float]]] = [[] for _ in TRACKED]
    for step in range(STEPS):
        for batch in arrange(step, samplers):
            rows = np.stack([row for _, _, row in batch])
            if len(batch) % 2:  # a strided view, rows at odd offsets, as a graph's (B, T, vocab) output gives
                padded = np.zeros((len(batch), 2, VOCAB + 3), dtype=np.float32)
                padded[:, 1, :VOCAB] = rows
                rows = padded[:, 1, :VOCAB]
            tokens, logprobs = sample_batch(rows, [s for _, s, _ in batch], [True] * len(batch))
            for (i, _, _), t, lp in zip(batch, tokens, logprobs):
                if i is not None:
                    out[i].append((t, lp))
    return out


def tracked(step: int, samplers: list[Sampler]) -> list[tuple[int, Sampler, np.ndarray]]:
    return [(i, s, step_logits(kind, i, step)) for i, (s, (_, kind)) in enumerate(zip(samplers, TRACKED))]


def test_every_sequence_samples_the_same_alone_or_in_any_batch():
    alone = run_batches(lambda step, samplers: [[entry] for entry in tracked(step, samplers)])

    def shuffled(step, samplers):
        entries = tracked(step, samplers)
        return [[entries[j] for j in np.random.default_rng(step).permutation(len(entries))]]

    def with_neighbours(step, samplers):
        r = np.random.default_rng(1000 + step)
        entries = tracked(step, samplers)
        order = r.permutation(len(entries))
        batches = []
        for part in np.array_split(order, r.integers(1, 5)):
            batch = [entries[j] for j in part] + [
                (None, s, row) for s, row in fillers(r, int(r.integers(0, 12)))
            ]
            batches.append([batch[j] for j in r.permutation(len(batch))])
        return batches

    together = run_batches(lambda step, samplers: [tracked(step, samplers)])
    backwards = run_batches(lambda step, samplers: [tracked(step, samplers)[::-1]])
    for name, other in [("together", together), ("backwards", backwards)]:
        assert other == alone, name
    assert run_batches(shuffled) == alone
    assert run_batches(with_neighbours) == alone
    assert all(
        len({t for t, _ in seq}) > 1 for seq, (p, _) in zip(alone, TRACKED) if not p.greedy and p.top_k != 1
    )


def test_a_sequence_samples_the_same_whatever_shares_the_batch():
    p = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)
    alone = Sampler(p, 42)
    together = Sampler(p, 42)
    others = [Sampler(SamplingParams(temperature=1.5), seed=i) for i in range(5)]
    alone_tokens, together_tokens = [], []
    for step in range(10):
        row = LOGITS[step % 6]
        alone_tokens.append(sample_batch(row[None], [alone], [False])[0][0])
        batch = np.stack([LOGITS[(step + k) % 6] for k in range(5)] + [row])
        together_tokens.append(sample_batch(batch, [*others, together], [False] * 6)[0][-1])
    assert alone_tokens == together_tokens


# -- the parts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranked_is_the_head_of_a_stable_sort(dtype):
    r = np.random.default_rng(11)
    for vocab in [2, 3, 100, 5000, VOCAB]:
        rows = [r.normal(size=vocab) * 4, r.standard_cauchy(size=vocab), np.zeros(vocab)]
        tied = np.full(vocab, -5.0)  # ties at the candidates' edge
        tied[: NUCLEUS_CANDIDATES // 2] = 1.0
        masked = np.full(vocab, -np.inf)  # crowded: most tokens tie at -inf
        masked[r.choice(vocab, max(1, vocab // 100), replace=False)] = 0.5
        zeros = np.where(r.random(vocab) < 0.5, -0.0, 0.0)  # -0.0 and 0.0 are equal: ties by id
        zeros[r.random(vocab) < 0.3] = -1.0
        rows += [tied, masked, zeros, r.integers(-2, 2, size=vocab)]
        x = np.stack(rows).astype(dtype)
        full = np.argsort(-x, axis=1, kind="stable")
        for width in sorted({1, 2, 50, NUCLEUS_CANDIDATES, 2048, vocab // 3, vocab - 1, vocab} - {0}):
            if width <= vocab:
                assert (_ranked(x, width) == full[:, :width]).all(), (vocab, width)


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.9)]
)
def test_a_draw_of_zero_never_lands_on_a_token_without_mass(params):
    # 640 tokens: the whole-vocabulary draw's columns are tokens t = j (mod 10). Columns 0 to 2 hold no mass,
    # nor do the first 20 tokens of every other column.
    tokens = np.arange(640)
    row = np.where((tokens % 10 < 3) | (tokens < 200), -np.inf, 0.0).astype(np.float32)
    for u in [0.0, 1 - 2**-53]:
        s = Sampler(params, seed=0)
        s.rng = Evenly(u)
        assert np.isfinite(row[s.sample(row)])


def test_greedy_is_argmax_vectorised_or_not():
    samplers = [Sampler(SamplingParams(), seed=i) for i in range(6)]
    tokens, logprobs = sample_batch(LOGITS, samplers, [True] * 6)
    assert tokens == LOGITS.argmax(axis=1).tolist()
    expected = log_softmax(LOGITS)[np.arange(6), LOGITS.argmax(axis=1)]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-6)


def test_same_seed_same_tokens_different_seed_different_tokens():
    p = SamplingParams(temperature=1.0)
    assert draw(p, 7, LOGITS[0]) == draw(p, 7, LOGITS[0])
    assert draw(p, 7, LOGITS[0]) != draw(p, 8, LOGITS[0])


def test_top_k_1_and_tiny_top_p_are_greedy():
    greedy = int(LOGITS[1].argmax())
    assert set(draw(SamplingParams(temperature=2.0, top_k=1), 3, LOGITS[1])) == {greedy}
    assert set(draw(SamplingParams(temperature=2.0, top_p=1e-6), 3, LOGITS[1])) == {greedy}


def test_top_k_1_breaks_ties_by_lower_id():
    logits = np.array([0.0, 2.0, 1.0, 2.0], dtype=np.float32)
    assert set(draw(SamplingParams(temperature=1.0, top_k=1), 0, logits)) == {1}
    assert set(draw(SamplingParams(temperature=1.0, top_k=2), 0, logits, n=200)) == {1, 3}


def test_top_k_keeps_only_the_k_best():
    allowed = set(np.argsort(-LOGITS[2])[:5].tolist())
    assert set(draw(SamplingParams(temperature=5.0, top_k=5), 1, LOGITS[2], n=200)) <= allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    seen = set(draw(SamplingParams(temperature=1.0, top_p=0.75), 0, logits, n=300))
    assert seen == {0, 1}


def test_low_temperature_concentrates_high_temperature_spreads():
    cold = draw(SamplingParams(temperature=0.01), 5, LOGITS[3], n=100)
    hot = draw(SamplingParams(temperature=50.0), 5, LOGITS[3], n=100)
    assert cold.count(int(LOGITS[3].argmax())) > 90
    assert len(set(hot)) > 20


def test_repetition_penalty_discourages_seen_tokens():
    logits = np.array([3.0, 2.9, -1.0], dtype=np.float32)
    s = Sampler(SamplingParams(repetition_penalty=2.0), seed=0, prompt_ids=[0])
    assert s.sample(logits) == 1  # 3.0 / 2 < 2.9
    s.observe(1)
    assert s.sample(logits) == 0  # both penalised: 1.5 > 1.45
    assert not s.simple_greedy


def test_a_penalty_below_1_favours_seen_tokens_even_greedy():
    logits = np.array([3.0, 2.0, -1.0], dtype=np.float32)
    s = Sampler(SamplingParams(repetition_penalty=0.5), seed=0, prompt_ids=[1, 7])
    assert s.sample(logits) == 1  # 2.0 / 0.5 > 3.0


def test_the_history_grows_and_counts_each_id_once():
    s = Sampler(SamplingParams(repetition_penalty=100.0), seed=0, prompt_ids=[3])
    row = np.full(200, 0.5, dtype=np.float32)
    row[:100] = 1.0
    for t in [*range(100), 5]:
        s.observe(t)
    assert sorted(s._ids[: s._count].tolist()) == list(range(100))
    assert s.sample(row) == 100  # every 1.0 penalised to 0.01: the first 0.5 wins


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_logprobs_are_those_of_the_model(penalty):
    s = Sampler(SamplingParams(temperature=0.7, repetition_penalty=penalty), 1)
    tokens, logprobs = sample_batch(LOGITS[:1], [s], [True])
    assert logprobs[0] == pytest.approx(float(log_softmax(LOGITS[:1])[0, tokens[0]]))


@pytest.mark.parametrize("temperature", [1e-310, 1e-12, 9e-6])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 30
    samplers = [Sampler(SamplingParams(temperature=temperature), seed=i) for i in range(4)]
    tokens, logprobs = sample_batch(logits, samplers, [True] * 4)
    assert tokens == logits.argmax(-1).tolist()
    assert all(np.isfinite(lp) for lp in logprobs)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(top_p=0.5, temperature=1),
    ],
)
def test_degenerate_rows_give_a_token_not_nan(params):
    nothing = np.full((1, 10), -np.inf, dtype=np.float32)
    assert sample_batch(nothing, [Sampler(params, 0)], [False])[0] == [0]
    # A penalty below 1 pushes two huge logits past float64: the draw stays among them.
    huge = np.array([[3e38, 1.0, 2e38, -1.0]], dtype=np.float32)
    p = SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, repetition_penalty=1e-300
    )
    tokens = {sample_batch(huge, [Sampler(p, seed, prompt_ids=[0, 2])], [False])[0][0] for seed in range(40)}
    assert tokens == ({0} if params.top_p < 1 else {0, 2})  # half of the mass: the first of the two alone
