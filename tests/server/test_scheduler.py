"""The generation scheduler on the quick generator, without gRPC.

Without an event loop the scheduler calls sinks in its own thread, between steps: a sink that cancels a
sequence therefore does so at an exact step boundary, which makes slot accounting deterministic."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.errors import DeadlineExceeded, InvalidInput, Overloaded
from server.generation.scheduler import GenerationScheduler
from server.metrics import Metrics
from server.types import FinishReason, GenerateRequest, GenerationChunk, SamplingParams, join_chunks

PROMPTS = ["def load(path):", "import os\n", "The quick brown fox", "class Parser:\n    def"]


class Collector:
    """A sink: gathers one request's chunks; `done` is set on the last chunk or an error."""

    def __init__(self, on_chunk=None) -> None:
        self.chunks: list[GenerationChunk] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.on_chunk = on_chunk

    def __call__(self, event) -> None:
        if isinstance(event, BaseException):
            self.error = event
            self.done.set()
            return
        self.chunks.append(event)
        if self.on_chunk is not None:
            self.on_chunk(event)
        if event.finish is not None:
            self.done.set()

    def result(self) -> GenerationChunk:
        assert self.done.wait(60), "generation did not finish"
        if self.error is not None:
            raise self.error
        return join_chunks(self.chunks)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def scheduler(generator, registry):
    s = GenerationScheduler(generator, max_active_sequences=4, max_queue_size=32, metrics=Metrics(registry))
    s.start()
    yield s
    s.close(10)


def run(scheduler, prompt: str, **params) -> GenerationChunk:
    sink = Collector()
    scheduler.submit(GenerateRequest("docgpt", prompt, SamplingParams(**params)), sink)
    return sink.result()


def run_together(scheduler, requests: list[tuple[str, dict]]) -> list[GenerationChunk]:
    sinks = [Collector() for _ in requests]
    for (prompt, params), sink in zip(requests, sinks):
        scheduler.submit(GenerateRequest("docgpt", prompt, SamplingParams(**params)), sink)
    return [s.result() for s in sinks]


def test_generates_to_max_new_tokens(scheduler):
    out = run(scheduler, PROMPTS[0], max_new_tokens=12)
    assert out.finish is FinishReason.LENGTH or out.finish is FinishReason.EOS
    assert out.usage.generated_tokens == len(out.token_ids) <= 12
    assert out.usage.prompt_tokens == len(scheduler.model.tokenizer.encode(PROMPTS[0]).ids)
    assert (
        0 <= out.timings.queue_seconds <= out.timings.time_to_first_token_seconds <= out.timings.total_seconds
    )


@pytest.mark.parametrize("penalty", [1.0, 1.5])  # the vectorised argmax, and the per-row greedy path
def test_greedy_output_is_the_same_alone_and_batched(scheduler, penalty):
    params = {"max_new_tokens": 20, "repetition_penalty": penalty}
    alone = [run(scheduler, p, **params) for p in PROMPTS]
    together = run_together(scheduler, [(p, params) for p in PROMPTS])
    assert [o.token_ids for o in together] == [a.token_ids for a in alone]
    assert [o.text for o in together] == [a.text for a in alone]


def test_a_sequence_joining_a_running_batch_gets_the_same_output(scheduler):
    alone = run(scheduler, PROMPTS[1], max_new_tokens=15)
    late = Collector()

    def join_once(chunk: GenerationChunk) -> None:
        # Runs in the decode thread between steps: the late request joins a batch already decoding.
        if late_submitted.is_set():
            return
        late_submitted.set()
        scheduler.submit(GenerateRequest("docgpt", PROMPTS[1], SamplingParams(max_new_tokens=15)), late)

    late_submitted = threading.Event()
    early = Collector(on_chunk=join_once)
    scheduler.submit(GenerateRequest("docgpt", PROMPTS[2], SamplingParams(max_new_tokens=30)), early)
    early.result()
    assert late.result().token_ids == alone.token_ids


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(scheduler):
    params = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 1234}
    alone = run(scheduler, PROMPTS[0], **params)
    noisy = [(p, {"max_new_tokens": 20, "temperature": 1.3, "seed": i}) for i, p in enumerate(PROMPTS[1:])]
    together = run_together(scheduler, [*noisy, (PROMPTS[0], params)])[-1]
    assert together.token_ids == alone.token_ids
    other_seed = run(scheduler, PROMPTS[0], **{**params, "seed": 99})
    assert other_seed.token_ids != alone.token_ids


def test_stop_sequence_spanning_tokens_ends_generation_and_is_not_returned(scheduler):
    params = {"max_new_tokens": 30, "temperature": 1.0, "seed": 7}
    pieces = [c.text for c in _chunks(scheduler, PROMPTS[0], params)]
    text = "".join(pieces)
    # A two-character stop made of the last character of one piece and the first of the next.
    boundary = next(i for i in range(1, len(pieces) - 1) if pieces[i] and pieces[i + 1] and len(text) > 2)
    stop = pieces[boundary][-1] + pieces[boundary + 1][0]
    out = run(scheduler, PROMPTS[0], **params, stop=("never-generated-text", stop))
    assert out.finish is FinishReason.STOP
    assert out.text == text[: text.find(stop)]
    assert stop not in out.text


def _chunks(scheduler, prompt, params) -> list[GenerationChunk]:
    sink = Collector()
    scheduler.submit(GenerateRequest("docgpt", prompt, SamplingParams(**params)), sink)
    sink.result()
    return sink.chunks


def test_eos_ends_generation(generator, registry):
    eos = generator.eos_ids
    s = GenerationScheduler(generator, max_active_sequences=2, max_queue_size=4)
    s.start()
    try:
        first = run(s, PROMPTS[3], max_new_tokens=5).token_ids[0]
        generator.eos_ids = frozenset({first})  # make the greedy first token the end-of-sequence token
        out = run(s, PROMPTS[3], max_new_tokens=5)
    finally:
        generator.eos_ids = eos
        s.close(10)
    assert out.finish is FinishReason.EOS
    assert out.token_ids == [first] and out.text == "" and out.usage.generated_tokens == 1


def test_logprobs_come_with_each_token(scheduler):
    out = run(scheduler, PROMPTS[2], max_new_tokens=10, temperature=0.8, seed=3, logprobs=True)
    assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)
    assert run(scheduler, PROMPTS[2], max_new_tokens=3).logprobs is None


def test_cancelled_sequence_leaves_at_the_next_step_and_frees_its_slot(scheduler, registry):
    handle = None

    def cancel_on_first(chunk: GenerationChunk) -> None:
        handle.cancel()

    sink = Collector(on_chunk=cancel_on_first)
    # A prompt whose first chunk has text; cancel as soon as it arrives.
    handle = scheduler.submit(GenerateRequest("docgpt", "hello", SamplingParams(max_new_tokens=100)), sink)
    _wait(lambda: sink.chunks and scheduler.active == 0)
    before = registry.get_sample_value("nlpserve_generated_tokens_total", {"model": "docgpt"})
    assert before < 100  # it stopped long before max_new_tokens
    # Cancelled while its first chunk was delivered, before the next step: the token that step computed for it
    # reached nobody and is not counted.
    assert before == sum(len(c.token_ids) for c in sink.chunks)
    assert registry.get_sample_value("nlpserve_active_sequences", {"model": "docgpt"}) == 0
    assert not sink.done.is_set()  # a cancelled request gets no final chunk
    # The slot is usable again.
    assert run(scheduler, PROMPTS[0], max_new_tokens=3).usage.generated_tokens <= 3


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_deadline_passed_while_waiting_is_refused_before_prefill(scheduler, registry):
    sink = Collector()
    scheduler.submit(GenerateRequest("docgpt", PROMPTS[0], SamplingParams()), sink, deadline=time.monotonic())
    assert sink.done.wait(30)
    assert isinstance(sink.error, DeadlineExceeded)
    assert registry.get_sample_value("nlpserve_prompt_tokens_total", {"model": "docgpt"}) in (None, 0)


def test_waiting_queue_is_bounded(generator):
    s = GenerationScheduler(
        generator, max_active_sequences=1, max_queue_size=2
    )  # not started: nothing drains
    request = GenerateRequest("docgpt", PROMPTS[0], SamplingParams())
    s.submit(request, Collector())
    s.submit(request, Collector())
    with pytest.raises(Overloaded):
        s.submit(request, Collector())
    assert s.waiting == 2


def test_stream_and_unary_agree_on_the_event_loop(scheduler_on_loop_factory):
    async def main() -> None:
        s = scheduler_on_loop_factory()
        request = GenerateRequest(
            "docgpt", "😀 日本", SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)
        )
        chunks = [c async for c in s.stream(request)]
        unary = await s.generate(request)
        assert "".join(c.text for c in chunks) == unary.text
        assert [t for c in chunks for t in c.token_ids] == unary.token_ids
        assert len(unary.token_ids) == unary.usage.generated_tokens  # no chunk lost on the way
        assert chunks[-1].finish is not None and all(c.finish is None for c in chunks[:-1])
        assert not any("\ufffd" in c.text for c in chunks)
        await asyncio.to_thread(s.close, 10)

    asyncio.run(main())


def test_a_consumer_that_falls_behind_gets_the_waiting_chunks_as_one(scheduler_on_loop_factory, registry):
    generated = {"model": "docgpt"}

    def tokens_so_far() -> float:
        return registry.get_sample_value("nlpserve_generated_tokens_total", generated) or 0.0

    def hold_the_loop_until(condition) -> None:
        # Blocks the event loop on purpose (as a slow client or a busy loop would): the decode thread runs on,
        # and what it delivers waits, undelivered, until the loop runs again. Held on a condition, not a time.
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.005)

    async def main() -> None:
        s = scheduler_on_loop_factory(Metrics(registry))
        request = GenerateRequest(
            "docgpt", "def load(path):", SamplingParams(max_new_tokens=48, logprobs=True)
        )
        paced = [c async for c in s.stream(request)]  # one chunk per token or fewer: as the loop keeps up
        length = join_chunks(paced).usage.generated_tokens
        # The same request, its consumer as far behind as can be: the loop is held from the submission until
        # the decode thread has handed over the last chunk, so every chunk waits when the stream is next read.
        # That hand-over is seen through a request submitted once the sequence's last token is counted: the
        # scheduler admits it only at the next step boundary, after the step that ended the sequence delivered.
        before = tokens_so_far()
        stream = s.stream(request)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the stream submits its request, and waits for its first chunk
        hold_the_loop_until(lambda: tokens_so_far() >= before + length)
        s.submit(GenerateRequest("docgpt", "x", SamplingParams(max_new_tokens=1)), Collector())
        hold_the_loop_until(lambda: s.waiting == 0)
        slow = [await first] + [c async for c in stream]
        for chunks in (paced, slow):
            assert chunks[-1].finish is not None and all(c.finish is None for c in chunks[:-1])
            joined = join_chunks(chunks)
            assert len(joined.token_ids) == len(joined.logprobs) == joined.usage.generated_tokens == 48
        assert len(slow) == 1, "the chunks that waited were not sent as one"
        assert join_chunks(slow).text == join_chunks(paced).text
        assert join_chunks(slow).token_ids == join_chunks(paced).token_ids
        assert join_chunks(slow).logprobs == pytest.approx(join_chunks(paced).logprobs)
        await asyncio.to_thread(s.close, 10)

    asyncio.run(main())


@pytest.fixture
def scheduler_on_loop_factory(generator):
    def make(metrics: Metrics | None = None) -> GenerationScheduler:
        s = GenerationScheduler(generator, max_active_sequences=4, max_queue_size=8, metrics=metrics)
        s.start(asyncio.get_running_loop())
        return s

    return make


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", {}, "prompt"),
        ("x", {"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ("x", {"max_new_tokens": 10_000}, "parameters.max_new_tokens"),
        ("x", {"temperature": -0.1}, "parameters.temperature"),
        ("x", {"temperature": float("nan")}, "parameters.temperature"),
        ("x", {"top_k": -1}, "parameters.top_k"),
        ("x", {"top_p": 0.0}, "parameters.top_p"),
        ("x", {"top_p": 1.5}, "parameters.top_p"),
        ("x", {"repetition_penalty": 0.0}, "parameters.repetition_penalty"),
        ("x", {"stop": ("a",) * 9}, "parameters.stop"),
        ("x", {"stop": ("a", "")}, "parameters.stop[1]"),
        ("word " * 500, {}, "prompt"),
    ],
)
def test_bad_requests_name_the_field(generator, prompt, params, field):
    with pytest.raises(InvalidInput) as exc:
        generator.prepare(GenerateRequest("docgpt", prompt, SamplingParams(**params)))
    assert exc.value.field == field


def test_prompt_too_long_names_both_numbers(generator):
    limit = generator.context_length
    prompt_ids = generator.tokenizer.encode("a b c d e f").ids
    with pytest.raises(InvalidInput) as exc:
        generator.prepare(GenerateRequest("docgpt", "a b c d e f", SamplingParams(max_new_tokens=limit - 1)))
    assert f"{len(prompt_ids)} prompt tokens" in str(exc.value) and f"max_new_tokens {limit - 1}" in str(
        exc.value
    )
    assert str(limit) in str(exc.value)


def test_a_failing_step_fails_only_its_own_sequences(generator):
    s = GenerationScheduler(generator, max_active_sequences=4, max_queue_size=8)
    real_decode = generator.decode
    failures = []

    def decode_failing_once(*args):
        if not failures:
            failures.append(1)
            raise RuntimeError("the model crashed")
        return real_decode(*args)

    generator.decode = decode_failing_once  # fault injection: the real model, one failing call
    s.start()
    try:
        victim = Collector()
        s.submit(GenerateRequest("docgpt", PROMPTS[0], SamplingParams(max_new_tokens=10)), victim)
        assert victim.done.wait(30)
        assert isinstance(victim.error, RuntimeError)
        after = run(s, PROMPTS[0], max_new_tokens=5)  # the scheduler keeps serving
        assert after.usage.generated_tokens >= 1 and s.active == 0
    finally:
        generator.decode = real_decode
        s.close(10)


def test_io_binding_path_gives_the_same_tokens(generator, generator_config):
    # The IO binding path (CUDA's) forced on the CPU: the cache stays in OrtValues between steps and comes
    # back to the host when sequences join or leave. Same tokens as the plain path, alone and batched.
    from server.config import Device
    from server.generation.model import GeneratorModel
    from server.runtime import Session

    bound = GeneratorModel(
        generator_config, Session(generator_config.model_file("fp32")[1], Device.CPU, io_binding=True)
    )
    assert bound.session.io_binding
    _, cache = bound.prefill([bound.tokenizer.encode(PROMPTS[0]).ids])
    assert not isinstance(cache.keys[0], np.ndarray)  # an OrtValue, fed back as it is
    requests = [
        (p, {"max_new_tokens": 8 + 4 * i, "temperature": 0.9, "seed": i}) for i, p in enumerate(PROMPTS)
    ]
    outputs = []
    for model in (generator, bound):
        s = GenerationScheduler(model, max_active_sequences=3, max_queue_size=8)
        s.start()
        try:
            outputs.append([o.token_ids for o in run_together(s, requests)])
        finally:
            s.close(10)
    assert outputs[0] == outputs[1]


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled(generator, registry):
    # A GPT-2-sized model trained on a small corpus has more logit rows than its tokenizer has ids.
    import dataclasses

    from server.generation.model import GeneratorModel

    config = generator.config
    small = 40
    config = dataclasses.replace(config, architecture={**config.architecture, "tokenizer_vocab_size": small})
    model = GeneratorModel(config, generator.session)
    s = GenerationScheduler(model, max_active_sequences=4, max_queue_size=32, metrics=Metrics(registry))
    s.start()
    try:
        sinks = [Collector() for _ in range(4)]
        for seed, sink in enumerate(sinks):
            params = SamplingParams(max_new_tokens=24, temperature=5.0, seed=seed, logprobs=True)
            s.submit(GenerateRequest("docgpt", "def load(path):", params), sink)
        ids = [t for sink in sinks for t in sink.result().token_ids]
    finally:
        s.close(10)
    assert ids and max(ids) < small, ids


def _lengths(chunks) -> list[list[int]]:
    return [[len(s.prepared.prompt_ids) for s in chunk] for chunk in chunks]


@pytest.mark.parametrize(
    "lengths, all_positions, expected",
    [
        (
            [12] * 15 + [126],
            False,
            [[12] * 15, [126]],
        ),  # a long prompt does not pad the short ones to its length
        ([40, 31, 35, 30] * 4, False, [sorted([40, 31, 35, 30] * 4)]),  # similar lengths: one batch
        ([1000] * 10, False, [[1000] * 8, [1000] * 2]),  # at most PREFILL_TOKENS padded tokens
        ([9000, 3], False, [[3], [9000]]),  # a prompt longer than that goes alone
        ([100] * 30, True, [[100] * 13, [100] * 13, [100] * 4]),  # all-position logits within 256 MiB
    ],
)
def test_prefill_batches_group_similar_lengths_within_bounds(lengths, all_positions, expected):
    from types import SimpleNamespace

    from server.generation.scheduler import prefill_chunks

    group = [SimpleNamespace(prepared=SimpleNamespace(prompt_ids=[0] * n)) for n in lengths]
    assert _lengths(prefill_chunks(group, 50_257, all_positions)) == expected


def test_a_row_cancelled_since_the_last_step_frees_its_place_at_once(generator):
    # The boundary's admission, driven step by step (no thread): a cancelled row leaves at this boundary, so
    # a waiting request takes its place now, not one decode step later.
    s = GenerationScheduler(generator, max_active_sequences=2, max_queue_size=4)
    handles = [
        s.submit(GenerateRequest("docgpt", p, SamplingParams(max_new_tokens=50)), Collector())
        for p in PROMPTS[:2]
    ]
    events: list = []
    s._iterate(s._admit(), events)
    assert s.active == 2
    s.submit(GenerateRequest("docgpt", PROMPTS[2], SamplingParams(max_new_tokens=50)), Collector())
    assert s._admit() == []  # both places are taken
    handles[0].cancel()
    admitted = s._admit()
    assert [seq.prepared.request.prompt for seq in admitted] == [PROMPTS[2]]
    s._iterate(admitted, events)
    assert s.active == 2 and [seq.prepared.request.prompt for seq in s._active] == [PROMPTS[1], PROMPTS[2]]


def test_stream_interval_sends_fewer_larger_chunks_of_the_same_tokens(generator, scheduler):
    """stream_interval 3: the first token at once, then chunks of 3 tokens, the rest with the last chunk; the
    same tokens and text as one chunk per token (greedy)."""
    every = Collector()
    scheduler.submit(GenerateRequest("docgpt", PROMPTS[0], SamplingParams(max_new_tokens=12)), every)
    expected = every.result()
    grouped = GenerationScheduler(generator, max_active_sequences=4, max_queue_size=8, stream_interval=3)
    grouped.start()
    try:
        sink = Collector()
        grouped.submit(GenerateRequest("docgpt", PROMPTS[0], SamplingParams(max_new_tokens=12)), sink)
        out = sink.result()
    finally:
        grouped.close(10)
    assert out.token_ids == expected.token_ids and out.text == expected.text
    sizes = [len(c.token_ids) for c in sink.chunks]
    assert sizes[0] == 1 and all(n >= 3 for n in sizes[1:-1]) and sum(sizes) == len(out.token_ids)
    n = len(out.token_ids)
    assert len(sink.chunks) <= 1 + -(-(n - 1) // 3), sizes  # the first, then one per 3 tokens at most


def _ordered_sinks(count: int) -> tuple[list[Collector], list[tuple[int, bool]]]:
    """Sinks that also record, in one list, (request, finished) for every chunk in the order they came."""
    order: list[tuple[int, bool]] = []
    sinks = [
        Collector(on_chunk=lambda chunk, i=i: order.append((i, chunk.finish is not None))) for i in range(count)
    ]
    return sinks, order


@pytest.mark.parametrize("room", ["one", "two"])
def test_kv_cache_tokens_bound_the_concatenating_batch(generator_config, generator, registry, room):
    # Two requests reserving R tokens each (prompt + max_new_tokens): a cache of 2R - 1 tokens runs them one
    # after the other, one of 2R together. Submitted before the thread starts, so both wait at the first
    # boundary: the order of their chunks shows which.
    from server.generation.model import GeneratorModel

    prompt, max_new = PROMPTS[0], 10
    reserved = len(generator.tokenizer.encode(prompt).ids) + max_new
    tokens = 2 * reserved - (1 if room == "one" else 0)
    model = GeneratorModel(generator_config, generator.session, 4, kv_cache_tokens=tokens)
    model.eos_ids = frozenset()  # every request runs to max_new_tokens
    assert (model.kv_cache_tokens, model.sequence_limit) == (tokens, min(tokens, model.context_length))
    s = GenerationScheduler(model, max_active_sequences=4, max_queue_size=8, metrics=Metrics(registry))
    sinks, order = _ordered_sinks(2)
    for sink in sinks:
        s.submit(GenerateRequest("docgpt", prompt, SamplingParams(max_new_tokens=max_new)), sink)
    s.start()
    try:
        outs = [sink.result() for sink in sinks]
    finally:
        s.close(10)
    assert [o.usage.generated_tokens for o in outs] == [max_new, max_new]
    assert outs[0].token_ids == outs[1].token_ids  # greedy, same prompt: waiting changed nothing
    first_done = order.index((0, True))
    second_starts = order.index(next(e for e in order if e[0] == 1))
    if room == "one":
        assert first_done < second_starts, order
    else:
        assert second_starts < first_done, order
    labels = {"model": generator_config.name}
    assert registry.get_sample_value("nlpserve_kv_cache_capacity_tokens", labels) == tokens
    assert registry.get_sample_value("nlpserve_kv_cache_reserved_tokens", labels) == 0


def test_kv_cache_tokens_limit_one_sequence(generator_config, generator):
    from server.errors import StartupError
    from server.generation.model import GeneratorModel

    model = GeneratorModel(generator_config, generator.session, 4, kv_cache_tokens=20)
    assert model.sequence_limit == 20 and model.max_new_tokens == 19
    prompt_tokens = len(generator.tokenizer.encode(PROMPTS[0]).ids)
    model.prepare(GenerateRequest("docgpt", PROMPTS[0], SamplingParams(max_new_tokens=20 - prompt_tokens)))
    with pytest.raises(InvalidInput, match="KV cache of 20") as info:
        model.prepare(GenerateRequest("docgpt", PROMPTS[0], SamplingParams(max_new_tokens=21 - prompt_tokens)))
    assert info.value.field == "prompt"
    with pytest.raises(StartupError, match="holds no sequence"):
        GeneratorModel(generator_config, generator.session, 4, kv_cache_tokens=1)
