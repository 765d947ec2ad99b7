"""The shared-buffer decoder path (GroupQueryAttention graphs, slot_cache.py) on a tiny exported Llama: slots
are taken lowest first and freed on leave, rows with holes between them decode exactly as each sequence
alone, and the scheduler returns every slot when its requests end."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from server.config import Device
from server.generation.model import SharedBufferGenerator, make_generator
from server.generation.scheduler import GenerationScheduler
from server.generation.slot_cache import SlotPool
from server.repository import ModelConfig
from server.runtime import Session
from server.types import GenerateRequest, SamplingParams


@pytest.fixture(scope="module")
def generator(llm_repo: Path) -> SharedBufferGenerator:
    config = ModelConfig.read(llm_repo / "tinyllama" / "1")
    model = make_generator(config, Session(config.path / "model.onnx", Device.CPU), 4)
    assert isinstance(model, SharedBufferGenerator)
    return model


def greedy_alone(model: SharedBufferGenerator, prompt: list[int], steps: int) -> list[int]:
    logits, cache = model.prefill([prompt])
    out = []
    for _ in range(steps):
        token = int(logits[0].argmax())
        out.append(token)
        logits, cache = model.decode([token], [0], cache)
    cache.release()
    return out


def test_pool_hands_out_lowest_free_slot_first() -> None:
    pool = SlotPool(num_layers=1, slots=3, kv_heads=1, max_length=4, head_size=2, dtype=np.float32)
    assert [pool.take(), pool.take(), pool.take()] == [0, 1, 2]
    pool.release([1, 0])
    assert pool.take() == 0 and pool.take() == 1 and pool.free == 0
    pool.reset()
    assert pool.free == 3


def test_rows_with_holes_decode_as_each_sequence_alone(generator: SharedBufferGenerator) -> None:
    prompts = [[5, 9, 30, 40], [100, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 201, 202]]
    steps = 12
    alone = [greedy_alone(generator, p, steps) for p in prompts]
    assert generator.pool.free == 4

    logits, cache = generator.prefill(prompts[:3])
    assert cache.slots == [0, 1, 2]
    outs: list[list[int]] = [[], [], [], []]
    rows = [0, 1, 2]  # which prompt each cache row is
    for step in range(steps):
        tokens = [int(t) for t in logits.argmax(-1)]
        for row, token in zip(rows, tokens):
            outs[row].append(token)
        if step == 3:  # the middle sequence leaves: slot 1 is a hole in the rows the next steps bind
            keep = [0, 2]
            cache = cache.select(keep)
            rows, tokens = [rows[k] for k in keep], [tokens[k] for k in keep]
            assert generator.pool.free == 2
        logits, cache = generator.decode(tokens, [0] * len(tokens), cache)
    assert outs[0] == alone[0] and outs[2] == alone[2]
    assert outs[1] == alone[1][:4]

    # A newcomer fills the hole; the old rows go on undisturbed.
    new_logits, new_cache = generator.prefill([prompts[3]])
    assert new_cache.slots == [1]
    cache.release()
    new_cache.release()
    assert generator.pool.free == 4
    assert int(new_logits[0].argmax()) == alone[3][0]


def test_scheduler_returns_every_slot(generator: SharedBufferGenerator) -> None:
    scheduler = GenerationScheduler(generator, max_active_sequences=2, max_queue_size=16)
    scheduler.start()
    prompts = ["The quick brown fox", "Hello", "Numbers like 12345", "A tiny model", "Crème brûlée"]
    expected = []
    for prompt in prompts:
        ids = greedy_alone(generator, generator.tokenizer.encode(prompt).ids, 6)
        ends = [j for j, t in enumerate(ids) if t in generator.eos_ids]  # the answer stops at its EOS
        expected.append(ids[: ends[0] + 1] if ends else ids)
    done = threading.Event()
    results: dict[int, list] = {i: [] for i in range(len(prompts))}

    def sink_for(i: int):
        def sink(event) -> None:
            results[i].append(event)
            if sum(1 for r in results.values() if r and getattr(r[-1], "finish", None)) == len(prompts):
                done.set()

        return sink

    try:
        for i, prompt in enumerate(prompts):
            request = GenerateRequest("tinyllama", prompt, SamplingParams(max_new_tokens=6))
            scheduler.submit(request, sink_for(i))
        assert done.wait(120)
    finally:
        scheduler.close(10)
    for i in range(len(prompts)):
        assert [t for chunk in results[i] for t in chunk.token_ids] == expected[i]
    assert generator.pool.free == generator.pool.slots
