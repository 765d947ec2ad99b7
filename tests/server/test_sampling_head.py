"""The sampling head (`--device-sampling`): a decode step's logits ranked by a second small graph where the model
computed them, so that only each row's candidates cross to the host. Here it runs on the CPU provider, the
same code path as on a GPU but for where the memory is: over 1,000 random batches it gives exactly the tokens
and log-probabilities of the host's sampler, rows needing the whole distribution included; it flags the rows
with NaN or +inf; and a decoder with it decodes the same tokens through the scheduler."""

from __future__ import annotations

import collections
import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_sampling import random_logits, random_params
from test_shared_buffer import drive

from server.config import Device
from server.generation.model import make_generator
from server.generation.sampling import Sampler, _ranked, finite_rows, greedy_tokens, sample_batch
from server.generation.sampling_head import DeviceLogits, SamplingHead
from server.generation.scheduler import GenerationScheduler
from server.repository import ModelConfig
from server.runtime import CPU, Session
from server.types import GenerateRequest, SamplingParams


def on_device(x: np.ndarray, vocab: int | None = None) -> DeviceLogits:
    """Logits (B, T, V) as the model's output OrtValue, with a CPU head over their first `vocab` columns."""
    head = SamplingHead(vocab or x.shape[-1], x.dtype, [CPU])
    return DeviceLogits(head, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x)))


def counted(function, counts: collections.Counter, name: str):
    """`function`, counting its calls in counts[name]."""

    def call(*args):
        counts[name] += 1
        return function(*args)

    return call


def test_head_ranks_as_the_host_does_ties_included():
    r = np.random.default_rng(7)
    for vocab, k in ((50, 1), (50, 50), (3000, 5), (3000, 256), (49_152, 50)):
        x = r.integers(-3, 4, size=(4, vocab)).astype(np.float32)  # ties everywhere
        values, ids = on_device(x[:, None, :]).top(k)
        assert np.array_equal(ids, _ranked(x, min(k, vocab)) if k > 1 else np.argmax(x, axis=1)[:, None])
        assert np.array_equal(values, np.take_along_axis(x, ids, axis=1))


def test_head_reads_the_last_position_and_the_sampled_vocabulary_of_fp16_logits():
    r = np.random.default_rng(3)
    x = r.normal(size=(3, 4, 120)).astype(np.float16)
    x[:, -1, 100:] = 1000  # past the sampled vocabulary: never a candidate
    logits = on_device(x, vocab=100)
    expected = x[:, -1, :100].astype(np.float32)
    assert np.array_equal(logits.host(), expected)
    assert greedy_tokens(logits) == np.argmax(expected, axis=1).tolist()
    assert np.array_equal(logits[[2, 0]].top(7)[1], _ranked(expected[[2, 0]], 7))


def test_non_finite_rows_are_flagged_as_on_the_host():
    x = np.zeros((5, 1, 30), dtype=np.float32)
    x[1, 0, 3] = np.nan
    x[2, 0, 4] = np.inf
    x[3, 0, :] = -np.inf  # no mass, but finite as the host counts it: a token all the same
    x[4, 0, 5] = -np.inf
    assert finite_rows(on_device(x)).tolist() == finite_rows(x[:, 0]).tolist() == [True, False, False, True, True]
    assert finite_rows(on_device(x)[[4, 1]]).tolist() == [True, False]
    # the same flags when the step's samplers are given: all needing the whole array (their flags from its host
    # copy), or top-k (from the head's run at k)
    whole = [Sampler(SamplingParams(temperature=0.7), i, []) for i in range(5)]
    assert finite_rows(on_device(x), whole).tolist() == [True, False, False, True, True]
    top = [Sampler(SamplingParams(temperature=0.7, top_k=3), i, []) for i in range(5)]
    assert finite_rows(on_device(x), top).tolist() == [True, False, False, True, True]


def test_same_tokens_and_logprobs_as_the_host_over_1000_random_batches():
    """Random rows (ties, heavy tails, -inf, fp16) and random parameters per row (greedy, top-k, top-p,
    temperatures, penalties with histories, log-probabilities): both paths give the same tokens, the same
    log-probabilities, and leave every sampler's generator in the same state."""
    r = np.random.default_rng(11)
    through_head = 0
    for case in range(1000):
        vocab = int(r.choice([2, 7, 64, 300, 1000, 3000]))
        rows = int(r.integers(1, 7))
        dtype = np.float16 if case % 5 == 0 else np.float32
        x = np.stack([random_logits(r, vocab) for _ in range(rows)]).astype(dtype)
        samplers = []
        for row in range(rows):
            p = random_params(r, vocab)
            seen = r.integers(0, vocab + 3, size=int(r.integers(0, 40))).tolist() if r.random() < 0.5 else []
            samplers.append(Sampler(p, int(r.integers(2**32)), seen))
        twins = copy.deepcopy(samplers)
        want = (r.random(rows) < 0.3).tolist()
        host = sample_batch(x.astype(np.float32), samplers, want)
        device = sample_batch(on_device(x[:, None, :]), twins, want)
        assert device == host, (case, [s.params for s in samplers])
        assert [s.rng.random() for s in samplers] == [s.rng.random() for s in twins], case
        through_head += sum(not s._count and (s.params.greedy or 0 < s.params.top_k < vocab) for s in samplers)
    assert through_head > 800  # rows drawn from the head's candidates (not the host copy), with this seed


@pytest.fixture(scope="module")
def tinyllama(llm_repo: Path) -> tuple[ModelConfig, Session]:
    config = ModelConfig.read(llm_repo / "tinyllama" / "1")
    return config, Session(config.path / "model.onnx", Device.CPU)


@pytest.mark.parametrize("chunk", [0, 3])
def test_a_decoder_with_the_head_decodes_the_same_tokens(tinyllama, chunk: int) -> None:
    config, session = tinyllama
    params = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=5),
        SamplingParams(max_new_tokens=12, temperature=1.2, seed=6),  # the whole distribution: a host copy
        SamplingParams(max_new_tokens=12, temperature=0.8, top_k=8, repetition_penalty=1.3, seed=7),
    ]
    prompts = ["one two three", "the cat sat", "a b c d e f g", "hello"]
    outputs = {}
    for sampling in (False, True):
        model = make_generator(config, session, 3, device_sampling=sampling)
        assert (model.head is not None) == sampling
        runs: collections.Counter[str] = collections.Counter()
        if sampling:  # count the head's runs against the decode steps
            model.head.rank = counted(model.head.rank, runs, "head")
            model.decode = counted(model.decode, runs, "decode")
        scheduler = GenerationScheduler(model, max_active_sequences=3, max_queue_size=8, prefill_chunk_tokens=chunk)
        results: dict[int, list] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            results[i] = []
            p = dataclasses.replace(p, logprobs=i % 2 == 0)
            scheduler.submit(GenerateRequest("tinyllama", prompt, p), results[i].append)
        drive(scheduler)  # 4 requests on 3 slots: one joins as another leaves
        for events in results.values():
            assert events and all(not isinstance(e, BaseException) for e in events), events
        outputs[sampling] = {i: [(e.token_ids, e.logprobs) for e in events] for i, events in results.items()}
        assert model.pool.free == model.pool.slots
        if sampling:  # the non-finite flags come from the run that ranks the candidates: one run a step
            assert 0 < runs["head"] <= runs["decode"], runs
    assert outputs[True] == outputs[False]


def test_chunks_riding_in_decode_calls_are_ranked_by_the_head(tinyllama) -> None:
    """Mixed steps (a prompt's chunk inside the running rows' decode call, export/mixed_step.py) take the head's
    path too: the call's logits stay where they were computed, the rows' and the chunk's ranked in one head
    run, and the tokens are those of the same generator without the head."""
    config, session = tinyllama
    mixed = Session(config.mixed_step_file("fp32"), Device.CPU)
    params = [
        SamplingParams(max_new_tokens=10),
        SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, seed=5),
        SamplingParams(max_new_tokens=10, temperature=0.8, top_k=8, repetition_penalty=1.3, seed=7),
    ]
    # the first prompt is written alone; the others arrive a step later, while it decodes, and ride in chunks
    prompts = ["a b c d e f g", "the cat sat on the mat", "one two three four five six seven"]
    outputs = {}
    for sampling in (False, True):
        model = make_generator(config, session, 3, device_sampling=sampling, mixed=mixed)
        calls: list[tuple[type, type, int]] = []
        real = model.decode_with_chunk

        def spy(*args, real=real, calls=calls):
            rows, cache, chunk = real(*args)
            calls.append((type(rows), type(chunk), len(chunk)))
            return rows, cache, chunk

        model.decode_with_chunk = spy
        scheduler = GenerationScheduler(model, max_active_sequences=3, max_queue_size=8, prefill_chunk_tokens=4)
        results: dict[int, list] = {i: [] for i in range(len(prompts))}
        scheduler.submit(GenerateRequest("tinyllama", prompts[0], params[0]), results[0].append)
        drive(scheduler, steps=3)  # its prompt written, its first decode steps
        assert scheduler._active and not calls
        for i in (1, 2):
            scheduler.submit(GenerateRequest("tinyllama", prompts[i], params[i]), results[i].append)
        drive(scheduler)
        for events in results.values():
            assert events and all(not isinstance(e, BaseException) for e in events), events
        outputs[sampling] = {i: [e.token_ids for e in events] for i, events in results.items()}
        assert model.pool.free == model.pool.slots
        kind = DeviceLogits if sampling else np.ndarray
        assert calls and all(rows is kind and chunk is kind and n == 1 for rows, chunk, n in calls), calls
    assert outputs[True] == outputs[False]
