"""The shared-buffer decoder path (GroupQueryAttention graphs, slot_cache.py) on a tiny exported Llama, and on a
tiny GPT-2 exported with `--kv-cache shared-buffer` (its own graph writer, positions from the mask): slots
are taken lowest first and freed on leave, rows with holes between them decode exactly as each sequence
alone, and the scheduler returns every slot when its requests end; chunked prefill writes a prompt over
several steps with the same result, beside running streams, and a cancel or a deadline stops it between
chunks."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server.config import Device
from server.errors import DeadlineExceeded
from server.generation.model import PreparedRequest, SharedBufferGenerator, batchable, make_generator
from server.generation.scheduler import GenerationScheduler
from server.generation.slot_cache import SlotCache, SlotPool
from server.repository import ModelConfig
from server.runtime import Session
from server.types import GenerateRequest, SamplingParams


@pytest.fixture(scope="module", params=["tinyllama", "gpt2slots"])
def generator(request: pytest.FixtureRequest) -> SharedBufferGenerator:
    repo: Path = request.getfixturevalue("gpt2_repo" if request.param.startswith("gpt2") else "llm_repo")
    config = ModelConfig.read(repo / request.param / "1")
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


def test_pool_reuse_copies_the_longest_beginning_a_slot_holds() -> None:
    from server.generation.slot_cache import REUSE_MIN_TOKENS as least

    pool = SlotPool(num_layers=1, slots=3, kv_heads=1, max_length=40, head_size=2, dtype=np.float32)
    first, second = pool.take(), pool.take()
    for buffer in pool._buffers:  # stand-ins for what two prefills wrote
        buffer[first] = np.arange(80, dtype=np.float32).reshape(1, 40, 2)
        buffer[second] = -1.0
    shared = list(range(100, 100 + least))
    pool.wrote(first, 0, [*shared, 1, 2])
    pool.wrote(second, 0, shared[:-1])
    new = pool.take()
    assert pool.reuse(new, [*shared, 1, 9, 9]) == least + 1  # from `first`, the longest match, copied
    for b in range(2):
        np.testing.assert_array_equal(pool.host_rows(b, new, least + 1), pool.host_rows(b, first, least + 1))
    assert pool.held(new) == least + 1
    assert pool.reuse(new, [*shared, 1, 2]) == least + 1  # the whole prompt held: its last token is computed
    pool.writing(new, least)  # a call about to write from there on: what was there is no longer known
    assert pool.held(new) == least
    pool.wrote(new, least + 2, [7])  # a write past what is known records nothing
    assert pool.held(new) == least
    assert pool.reuse(new, [*shared[:-1], 5, 5]) == 0 and pool.held(new) == 0  # shorter than the least reused
    pool.release([first])  # a free slot keeps what it holds
    assert pool.held(first) == least + 2
    pool.reset()
    assert [pool.held(s) for s in range(3)] == [0, 0, 0]


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


def test_batchable_takes_prompts_of_one_length_in_neighbouring_slots() -> None:
    assert batchable([5, 5, 5], [2, 3, 4], 100) == 3
    assert batchable([5, 5, 4, 5], [0, 1, 2, 3], 100) == 2  # a prompt of another length ends the run
    assert batchable([5, 5], [0, 2], 100) == 1  # not neighbours: one call binds consecutive rows
    assert batchable([5, 5, 5], [0, 1, 2], 10) == 2  # within the budget
    assert batchable([50, 50], [0, 1], 10) == 1  # the first alone, whatever its length


def spy_rows(generator: SharedBufferGenerator) -> list[tuple[int, int]]:
    """Records (first slot, rows) of every `prefill_rows` call on `generator` (undo: del generator.prefill_rows)."""
    real, calls = generator.prefill_rows, []

    def spy(first_slot, prompts, done=0, interrupt=None):
        calls.append((first_slot, len(prompts)))
        return real(first_slot, prompts, done, interrupt)

    generator.prefill_rows = spy
    return calls


def test_prompts_of_one_length_are_prefilled_in_one_call(generator: SharedBufferGenerator) -> None:
    """Three prompts of one length go into neighbouring slots in one call, the shorter fourth in its own; each
    then decodes exactly as it does alone."""
    prompts = [[5, 9, 30, 40], [100, 7, 8, 9], [3, 4, 5, 6], [200, 201]]
    steps = 8
    alone = [greedy_alone(generator, p, steps) for p in prompts]
    calls = spy_rows(generator)
    try:
        logits, cache = generator.prefill(prompts)
    finally:
        del generator.prefill_rows
    assert calls == [(0, 3), (3, 1)] and cache.slots == [0, 1, 2, 3]
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        tokens = [int(t) for t in logits.argmax(-1)]
        for out, token in zip(outs, tokens):
            out.append(token)
        logits, cache = generator.decode(tokens, [0] * len(tokens), cache)
    cache.release()
    assert outs == alone
    assert generator.pool.free == generator.pool.slots


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


def test_a_prompt_written_in_chunks_continues_as_one_written_whole(generator: SharedBufferGenerator) -> None:
    """GroupQueryAttention attends to what a slot holds plus the chunk: a prompt prefilled in chunks of 1-4
    tokens gives the logits of the whole prompt, and the same greedy continuation."""
    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    whole_logits, whole = generator.prefill([prompt])
    whole.release()
    expected = greedy_alone(generator, prompt, 8)
    for size in (1, 2, 4):
        slot = generator.pool.take()
        for done in range(0, len(prompt), size):
            logits = generator.prefill_chunk(slot, prompt[done : done + size], done)
        np.testing.assert_allclose(logits, whole_logits, atol=1e-4)
        cache = SlotCache(generator.pool, [slot], [len(prompt)])
        out = []
        for _ in range(8):
            out.append(int(logits[0].argmax()))
            logits, cache = generator.decode([out[-1]], [0], cache)
        cache.release()
        assert out == expected, size
    assert generator.pool.free == generator.pool.slots


def drive(scheduler: GenerationScheduler, steps: int | None = None) -> None:
    """Runs the scheduler's step boundaries in this thread (deterministic: no decode thread)."""
    n = 0
    while (scheduler._waiting or scheduler._active or scheduler._prefilling) and (steps is None or n < steps):
        with scheduler._cond:
            admitted = scheduler._admit()
        events: list = []
        scheduler._iterate(admitted, events)
        for sink, event in events:
            sink(event)
        n += 1


def collect() -> tuple[dict[str, list], Callable[[str], Callable[[object], None]]]:
    results: dict[str, list] = {}

    def sink_for(name: str):
        results[name] = []
        return results[name].append

    return results, sink_for


def tokens(events: list) -> list[int]:
    assert all(not isinstance(e, BaseException) for e in events), events
    return [t for e in events for t in e.token_ids]


def beside_a_running_stream(generator: SharedBufferGenerator, watch: Callable = contextlib.nullcontext) -> int:
    """A prompt written 4 tokens per step into a lower slot while a stream decodes in a higher one (the step
    spans the slot being written): both streams give exactly the tokens of each alone; every slot comes back.
    The scheduler's steps run inside `watch()`. Returns the length of the prompt written in chunks."""
    scheduler = GenerationScheduler(generator, max_active_sequences=3, max_queue_size=8, prefill_chunk_tokens=4)
    results, sink_for = collect()
    ids = {"a": [5, 9], "b": [100, 7, 8], "c": [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]}
    max_new = {"a": 1, "b": 10, "c": 6}
    prepared = {}
    for name, prompt in ids.items():
        request = GenerateRequest("tinyllama", generator.tokenizer.decode(prompt), SamplingParams(max_new_tokens=max_new[name]))
        prepared[name] = generator.prepare(request)  # its ids: what the tokenizer gives back for the decoded text
    expected = {}
    for name, p in prepared.items():
        alone = greedy_alone(generator, p.prompt_ids, max_new[name])
        ends = [j for j, t in enumerate(alone) if t in generator.eos_ids]
        expected[name] = alone[: ends[0] + 1] if ends else alone

    def submit(name: str) -> None:
        scheduler.submit(prepared[name].request, sink_for(name), prepared=prepared[name])

    with watch():
        submit("a")  # slot 0: ends at its first token, a hole below b
        submit("b")  # slot 1
        drive(scheduler, 2)
        assert [s.slot for s in scheduler._active] == [1] and generator.pool.free == generator.pool.slots - 1
        submit("c")  # slot 0, several steps of 4 prompt tokens while b decodes in slot 1
        drive(scheduler, 1)
        assert [s.slot for s in scheduler._prefilling] == [0] or len(prepared["c"].prompt_ids) <= 4
        drive(scheduler)
    for name in ids:
        assert tokens(results[name]) == expected[name], name
    assert generator.pool.free == generator.pool.slots
    return len(prepared["c"].prompt_ids)


def test_chunked_prefill_beside_running_streams(generator: SharedBufferGenerator) -> None:
    beside_a_running_stream(generator)


def with_mixed_steps(folder: Path) -> SharedBufferGenerator:
    """The model in `folder` with the mixed-step graph its export wrote beside model.onnx (export/mixed_step.py)."""
    config = ModelConfig.read(folder)
    mixed = config.mixed_step_file("fp32")
    assert mixed is not None and mixed.name == "model.mixed.onnx"
    model = make_generator(
        config, Session(config.path / "model.onnx", Device.CPU), 4, mixed=Session(mixed, Device.CPU)
    )
    assert isinstance(model, SharedBufferGenerator)
    return model


@pytest.fixture(scope="module")
def mixed_generator(llm_repo: Path) -> SharedBufferGenerator:
    """tinyllama with its mixed-step graph."""
    return with_mixed_steps(llm_repo / "tinyllama" / "1")


@pytest.fixture(scope="module", params=["tinyllama", "gpt2slots"])
def mixed_generators(request: pytest.FixtureRequest) -> SharedBufferGenerator:
    """tinyllama, and the tiny GPT-2 (learned positions, computed on each side of the mixed graph), with their
    mixed-step graphs."""
    repo: Path = request.getfixturevalue("gpt2_repo" if request.param.startswith("gpt2") else "llm_repo")
    return with_mixed_steps(repo / request.param / "1")


def test_mixed_steps_write_the_prompt_in_the_decode_call(mixed_generators: SharedBufferGenerator) -> None:
    """With the mixed-step graph, each chunk of the prompt goes into the running stream's decode call (its
    slot inside the span the call binds): the same tokens as each stream alone, no prefill call of its own."""
    model = mixed_generators
    real, calls = model.decode_with_chunk, []

    def spy(tokens, cache, slot, ids, done):
        calls.append((slot, len(ids), done))
        return real(tokens, cache, slot, ids, done)

    model.decode_with_chunk = spy
    alone: list[list[tuple[int, int]]] = []

    @contextlib.contextmanager
    def watch():
        alone.append(spy_rows(model))
        try:
            yield
        finally:
            del model.prefill_rows

    try:
        length = beside_a_running_stream(model, watch)
    finally:
        del model.decode_with_chunk
    # a and b had prefill calls of their own (nothing decoding beside them: a ends at its first token); c's
    # whole prompt went in chunks of 4 into slot 0, inside b's decode calls, and no call of its own
    assert [slot for slot, _ in alone[0]].count(0) == 1  # a's
    assert calls and all(slot == 0 and n <= 4 for slot, n, _ in calls)
    assert [done for _, _, done in calls] == list(range(0, length, 4))
    assert sum(n for _, n, _ in calls) == length


def test_a_burst_of_one_length_is_prefilled_together_beside_a_running_stream(
    generator: SharedBufferGenerator,
) -> None:
    """Chunked prefill: three requests of one prompt length that arrive together while a stream decodes are
    written in one call (their slots are neighbours above the running one); every stream gives the tokens it
    gives alone, and every slot comes back."""
    # Earlier tests left prompts in the slots that begin as some of these do ([5, 9], [3, 4, 5]): matches that
    # short are not reused (REUSE_MIN_TOKENS), so these prompts are still written together.
    scheduler = GenerationScheduler(generator, max_active_sequences=4, max_queue_size=8, prefill_chunk_tokens=64)
    results, sink_for = collect()
    prompts = {"run": [100, 7, 8], "x": [5, 9, 30, 40], "y": [3, 4, 5, 6], "z": [11, 12, 13, 14]}
    for name, max_new in (("run", 10), ("x", 5), ("y", 6), ("z", 4)):
        request = GenerateRequest("tinyllama", "(the ids)", SamplingParams(max_new_tokens=max_new))
        scheduler.submit(request, sink_for(name), prepared=PreparedRequest(request, prompts[name], max_new, 0))
        if name == "run":
            drive(scheduler, 1)
    calls = spy_rows(generator)
    try:
        drive(scheduler)
    finally:
        del generator.prefill_rows
    assert calls == [(1, 3)]
    for name, max_new in (("run", 10), ("x", 5), ("y", 6), ("z", 4)):
        alone = greedy_alone(generator, prompts[name], max_new)
        ends = [j for j, t in enumerate(alone) if t in generator.eos_ids]
        assert tokens(results[name]) == (alone[: ends[0] + 1] if ends else alone), name
    assert generator.pool.free == generator.pool.slots


def test_a_prompt_cancelled_between_chunks_frees_its_slot(generator: SharedBufferGenerator) -> None:
    scheduler = GenerationScheduler(generator, max_active_sequences=2, max_queue_size=8, prefill_chunk_tokens=2)
    results, sink_for = collect()
    long = GenerateRequest("tinyllama", "one two three four five six seven eight", SamplingParams(max_new_tokens=4))
    handle = scheduler.submit(long, sink_for("long"))
    drive(scheduler, 1)
    assert len(scheduler._prefilling) == 1 and scheduler.active == 1 and generator.pool.free == generator.pool.slots - 1
    handle.cancel()
    drive(scheduler)
    assert results["long"] == [] and scheduler.active == 0
    assert generator.pool.free == generator.pool.slots
    # A deadline that passes between chunks ends the prompt with DEADLINE_EXCEEDED, its slot freed.
    scheduler.submit(long, sink_for("late"), deadline=time.monotonic() + 3600)
    drive(scheduler, 1)
    scheduler._prefilling[0].deadline = time.monotonic() - 1
    drive(scheduler)
    (event,) = results["late"]
    assert isinstance(event, DeadlineExceeded) and "prefill" in str(event)
    assert generator.pool.free == generator.pool.slots


def test_kv_cache_tokens_shorten_the_slots(generator: SharedBufferGenerator) -> None:
    # Fewer tokens than slots x context: every slot is shorter, and a sequence that fits decodes as on the
    # full-length cache. Too few for 2 tokens a slot is a start-up error.
    from server.errors import InvalidInput, StartupError

    config, session = generator.config, generator.session
    length = generator.context_length // 2
    short = make_generator(config, session, 3, kv_cache_tokens=3 * length + 2)
    assert isinstance(short, SharedBufferGenerator)
    assert (short.sequence_limit, short.kv_cache_tokens, short.pool.max_length) == (length, 3 * length, length)
    assert short.max_new_tokens == length - 1
    assert short.reserved_tokens([1, 1]) == 2 * length  # a whole slot each, whatever the request
    prompt = [5, 9, 30, 40]
    steps = length - len(prompt)
    assert greedy_alone(short, prompt, steps) == greedy_alone(generator, prompt, steps)
    with pytest.raises(InvalidInput, match=f"the {length} tokens one sequence may hold"):
        short.prepare(GenerateRequest("tinyllama", "hello there", SamplingParams(max_new_tokens=length - 1)))
    with pytest.raises(StartupError, match="needs at least 2"):
        make_generator(config, session, 4, kv_cache_tokens=7)


def test_scheduler_waits_for_a_free_slot_of_a_short_cache(generator: SharedBufferGenerator) -> None:
    # Two slots, three requests: the third waits for a slot and still gets its tokens.
    short = make_generator(generator.config, generator.session, 2, kv_cache_tokens=2 * 12)
    scheduler = GenerationScheduler(short, max_active_sequences=2, max_queue_size=8)
    scheduler.start()
    try:
        done = [threading.Event() for _ in range(3)]
        chunks: list[list] = [[], [], []]

        def sink(i: int) -> Callable:
            def receive(event) -> None:
                assert not isinstance(event, BaseException), event
                chunks[i].append(event)
                if event.finish is not None:
                    done[i].set()

            return receive

        for i in range(3):
            scheduler.submit(GenerateRequest("tinyllama", "hello", SamplingParams(max_new_tokens=6)), sink(i))
        assert all(d.wait(60) for d in done)
    finally:
        scheduler.close(10)
    assert short.pool.free == 2
    assert len({tuple(t for c in cs for t in c.token_ids) for cs in chunks}) == 1


def test_an_interrupted_chunk_raises_and_leaves_the_session_usable(generator: SharedBufferGenerator) -> None:
    from server.generation.model import Interrupt, Interrupted

    prompt = [3, 4, 5, 6, 7, 8, 9]
    whole_logits, whole = generator.prefill([prompt])
    whole.release()
    slot = generator.pool.take()
    interrupt = Interrupt()
    interrupt.fire()
    with pytest.raises(Interrupted):
        generator.prefill_chunk(slot, prompt, 0, interrupt)
    # The slot's partial chunk is overwritten by its next occupant; the session serves on.
    np.testing.assert_allclose(generator.prefill_chunk(slot, prompt, 0, Interrupt()), whole_logits, atol=1e-5)
    generator.pool.release([slot])


@pytest.mark.parametrize("why", ["cancel", "deadline"])
def test_a_cancel_or_deadline_stops_a_running_chunk(generator: SharedBufferGenerator, why: str) -> None:
    """The cancel (from the front's thread) or the deadline's timer fires while a chunk is in its session
    call: the call stops (RunOptions.terminate), the slot is freed, and no later chunk runs."""
    # Without prefix caching: the chunks begin at position 0 whatever earlier tests left in the slots.
    scheduler = GenerationScheduler(
        generator, max_active_sequences=2, max_queue_size=8, prefill_chunk_tokens=2, prefix_caching=False
    )
    results, sink_for = collect()
    long = GenerateRequest("tinyllama", "one two three four five six seven eight", SamplingParams(max_new_tokens=4))
    handle = scheduler.submit(long, sink_for("long"), deadline=time.monotonic() + 3600)
    real, calls = generator.prefill_chunk, []

    def chunk_under_fire(slot, ids, done, interrupt=None):
        calls.append(done)
        if len(calls) == 2:  # the second chunk: its interrupt fires while it is in the call
            if why == "cancel":
                thread = threading.Thread(target=handle.cancel)
                thread.start()
                thread.join(60)
            else:
                scheduler._prefilling[0].deadline = time.monotonic()  # too late for the timer: fire it here
                interrupt.fire()
            assert interrupt.fired
        return real(slot, ids, done, interrupt)

    generator.prefill_chunk = chunk_under_fire
    try:
        drive(scheduler)
    finally:
        del generator.prefill_chunk
    assert calls == [0, 2] and scheduler.active == 0
    assert generator.pool.free == generator.pool.slots
    if why == "cancel":
        assert results["long"] == []
    else:
        (event,) = results["long"]
        assert isinstance(event, DeadlineExceeded) and "prefill" in str(event)


def test_the_deadline_timer_interrupts_a_chunk(generator: SharedBufferGenerator) -> None:
    # The timer itself: a chunk still in its call when the deadline passes is stopped by it. The chunk here
    # waits in its call until its interrupt fires (60 s at most), so only the timer can end it in time.
    scheduler = GenerationScheduler(
        generator, max_active_sequences=2, max_queue_size=8, prefill_chunk_tokens=2, prefix_caching=False
    )
    results, sink_for = collect()
    long = GenerateRequest("tinyllama", "one two three four five six seven eight", SamplingParams(max_new_tokens=4))
    scheduler.submit(long, sink_for("late"), deadline=time.monotonic() + 3600)
    real, waited = generator.prefill_chunk, []

    def slow_chunk(slot, ids, done, interrupt=None):
        if done == 2:
            give_up = time.monotonic() + 60
            while not interrupt.fired and time.monotonic() < give_up:
                time.sleep(0.01)
            waited.append(interrupt.fired)
        return real(slot, ids, done, interrupt)

    generator.prefill_chunk = slow_chunk
    try:
        drive(scheduler, 1)
        scheduler._prefilling[0].deadline = time.monotonic() + 2  # passes while the next chunk is in its call
        drive(scheduler)
    finally:
        del generator.prefill_chunk
    assert waited == [True]
    (event,) = results["late"]
    assert isinstance(event, DeadlineExceeded) and "prefill" in str(event)
    assert generator.pool.free == generator.pool.slots


def spy_writes(generator: SharedBufferGenerator) -> list[tuple[int, int, int]]:
    """Records (first slot, tokens written per row, tokens held before) of every `prefill_rows` call (undo: del
    generator.prefill_rows)."""
    real, calls = generator.prefill_rows, []

    def spy(first_slot, prompts, done=0, interrupt=None):
        calls.append((first_slot, len(prompts[0]), done))
        return real(first_slot, prompts, done, interrupt)

    generator.prefill_rows = spy
    return calls


@pytest.mark.parametrize("caching", [True, False])
def test_a_shared_beginning_is_copied_not_prefilled(generator: SharedBufferGenerator, caching: bool) -> None:
    """Prefix caching: a prompt that begins as a running stream's prompt gets those tokens' keys and values
    copied into its slot and writes only the rest (two such prompts of one length arriving together are written
    one after the other: GroupQueryAttention takes one row when it has past tokens); a prompt sent again writes
    only its last token. Every stream gives the tokens it gives alone."""
    generator.reset()
    scheduler = GenerationScheduler(
        generator, max_active_sequences=4, max_queue_size=8, prefill_chunk_tokens=64, prefix_caching=caching
    )
    results, sink_for = collect()
    shared = list(range(3, 3 + 20))
    prompts = {
        "first": [*shared, 40, 41], "second": [*shared, 50, 51, 52], "third": [*shared, 60, 61, 62],
        "again": [*shared, 50, 51, 52],
    }

    def submit(name: str, max_new: int) -> None:
        request = GenerateRequest("tinyllama", "(the ids)", SamplingParams(max_new_tokens=max_new))
        scheduler.submit(request, sink_for(name), prepared=PreparedRequest(request, prompts[name], max_new, 0))

    calls = spy_writes(generator)
    try:
        submit("first", 8)
        drive(scheduler, 2)
        assert [s.slot for s in scheduler._active] == [0]
        submit("second", 6)  # slots 1 and 2, beside `first` still decoding in slot 0
        submit("third", 5)
        drive(scheduler)
        submit("again", 6)  # into the lowest free slot, 0, which holds `first`; slot 1 holds all of it
        drive(scheduler)
    finally:
        del generator.prefill_rows
    if caching:
        assert calls == [(0, 22, 0), (1, 3, 20), (2, 3, 20), (0, 1, 22)]
    else:  # the two of one length together
        assert calls == [(0, 22, 0), (1, 23, 0), (0, 23, 0)]
    for name, max_new in (("first", 8), ("second", 6), ("third", 5), ("again", 6)):
        alone = greedy_alone(generator, prompts[name], max_new)
        ends = [j for j, t in enumerate(alone) if t in generator.eos_ids]
        assert tokens(results[name]) == (alone[: ends[0] + 1] if ends else alone), name
    assert generator.pool.free == generator.pool.slots


def test_a_shared_beginning_rides_in_the_decode_call(mixed_generator: SharedBufferGenerator) -> None:
    """Prefix caching with mixed steps: the rest of each prompt whose beginning was copied from a slot goes into
    the running stream's decode call, one prompt a step, after the copied tokens; a prompt arriving with
    nothing decoding has a call of its own. Every stream gives the tokens it gives alone."""
    model = mixed_generator
    model.reset()
    scheduler = GenerationScheduler(model, max_active_sequences=4, max_queue_size=8, prefill_chunk_tokens=64)
    results, sink_for = collect()
    shared = list(range(3, 3 + 20))
    prompts = {"first": [*shared, 40, 41], "second": [*shared, 50, 51, 52], "third": [*shared, 60, 61, 62],
               "again": [*shared, 50, 51, 52]}

    def submit(name: str, max_new: int) -> None:
        request = GenerateRequest("tinyllama", "(the ids)", SamplingParams(max_new_tokens=max_new))
        scheduler.submit(request, sink_for(name), prepared=PreparedRequest(request, prompts[name], max_new, 0))

    real, rode = model.decode_with_chunk, []

    def spy(tokens, cache, slot, ids, done):
        rode.append((slot, len(ids), done, len(tokens)))
        return real(tokens, cache, slot, ids, done)

    model.decode_with_chunk = spy
    calls = spy_writes(model)
    try:
        submit("first", 8)
        drive(scheduler, 2)
        submit("second", 6)
        submit("third", 5)
        drive(scheduler)
        submit("again", 6)
        drive(scheduler)
    finally:
        del model.prefill_rows, model.decode_with_chunk
    assert calls == [(0, 22, 0), (0, 1, 22)]  # `first` and `again` (nothing decoding beside it) alone
    assert rode == [(1, 3, 20, 1), (2, 3, 20, 2)]  # beside `first`, then beside `first` and `second`
    for name, max_new in (("first", 8), ("second", 6), ("third", 5), ("again", 6)):
        alone = greedy_alone(model, prompts[name], max_new)
        ends = [j for j, t in enumerate(alone) if t in model.eos_ids]
        assert tokens(results[name]) == (alone[: ends[0] + 1] if ends else alone), name
    assert model.pool.free == model.pool.slots
