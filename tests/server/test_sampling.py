"""Sampling: greedy, temperature, top-k, top-p, repetition penalty; seeded per request, batch-independent."""

from __future__ import annotations

import numpy as np
import pytest

from server.generation.sampling import NUCLEUS_CANDIDATES, Sampler, log_softmax, nucleus, sample_batch
from server.types import SamplingParams

rng = np.random.default_rng(0)
LOGITS = rng.normal(size=(6, 50)).astype(np.float32)


def draw(params: SamplingParams, seed: int, row: np.ndarray, n: int = 20) -> list[int]:
    s = Sampler(params, seed)
    return [s.sample(row) for _ in range(n)]


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


def test_top_k_1_and_tiny_top_p_are_greedy():
    greedy = int(LOGITS[1].argmax())
    assert set(draw(SamplingParams(temperature=2.0, top_k=1), 3, LOGITS[1])) == {greedy}
    assert set(draw(SamplingParams(temperature=2.0, top_p=1e-6), 3, LOGITS[1])) == {greedy}


def test_top_k_keeps_only_the_k_best():
    allowed = set(np.argsort(-LOGITS[2])[:5].tolist())
    assert set(draw(SamplingParams(temperature=5.0, top_k=5), 1, LOGITS[2], n=200)) <= allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    seen = set(draw(SamplingParams(temperature=1.0, top_p=0.75), 0, logits, n=300))
    assert seen == {0, 1}


def _full_sort_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-probs, kind="stable")
    return order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0, 30.0])
@pytest.mark.parametrize("top_p", [0.01, 0.5, 0.9, 0.999])
def test_nucleus_without_a_full_sort_is_the_full_sort_s_set(temperature, top_p):
    vocab = 50_257
    r = np.random.default_rng(int(temperature * 1000 + top_p * 10))
    rows = [r.normal(size=vocab) * 4, r.standard_cauchy(size=vocab)]
    tied = np.full(vocab, -5.0)  # ties at the candidates' edge: the partial sort must fall back, not guess
    tied[: NUCLEUS_CANDIDATES // 2] = 1.0
    rows += [tied, np.zeros(vocab)]
    for logits in rows:
        x = logits / temperature
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        assert nucleus(probs, top_p).tolist() == _full_sort_nucleus(probs, top_p).tolist()


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
