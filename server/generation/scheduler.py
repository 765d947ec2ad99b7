"""Continuous batching: one decode step at a time for every active sequence of a model.

A dedicated thread runs the loop (ONNX Runtime releases the GIL while it computes; the asyncio event loop
only moves requests in and chunks out):

1. at a step boundary, waiting requests are admitted up to ``max_active_sequences``; they are prefilled
   together, get their first token, and join the running batch (their caches joined to the batch's). With
   chunked prefill (shared-buffer decoders, ``prefill_chunk_tokens``), a step prefills at most that many
   prompt tokens, in order of arrival: a long prompt is written into its slot over several steps, so that the
   running sequences wait at most one chunk for their next token, and a cancel or a deadline stops it
   between chunks;
2. one decode step runs for every active sequence;
3. sequences that finished (length, stop sequence, EOS), were cancelled, or passed their deadline leave at
   once, and their slots are free for the next boundary.

Chunks go back through one ``deliver(list of (sink, chunk))`` call per step, which the asyncio front turns
into a single ``call_soon_threadsafe``: one wake-up of the event loop per step, not one per token.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import DeadlineExceeded, ModelFailure, Overloaded, Unavailable
from ..metrics import GENERATE, Metrics
from ..types import FinishReason, GenerateRequest, GenerationChunk, Timings, Usage, join_chunks
from .detokenize import IncrementalDetokenizer
from .kv_cache import KVCache
from .model import GeneratorModel, Interrupt, Interrupted, PreparedRequest, SharedBufferGenerator, batchable
from .sampling import Sampler, finite_rows, sample_batch
from .sampling_head import DeviceLogits
from .slot_cache import SlotCache
from .stopping import StopMatcher

log = logging.getLogger(__name__)

Event = GenerationChunk | BaseException
Sink = Callable[[Event], None]
Deliver = Callable[[list[tuple[Sink, Event]]], None]


@dataclass(eq=False)
class _Sequence:
    prepared: PreparedRequest
    sink: Sink
    arrival: float
    deadline: float | None
    sampler: Sampler
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    want_logprobs: bool
    cancelled: bool = False
    finished: bool = False  # its last chunk (or error) is on its way
    started: float = 0.0  # prefill start
    first_token: float = 0.0
    position: int = 0  # position of the next token fed (real tokens so far)
    last_id: int = 0  # the token to feed at the next step
    generated: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)
    pending_text: str = ""  # held back by stream_interval
    # chunked prefill: the KV slot being written, the prompt tokens in it so far, the time spent on them
    slot: int = -1
    prefilled: int = 0
    prefill_seconds: float = 0.0
    interrupt: Interrupt | None = None  # while a chunk of its prompt runs: stops it on a cancel

    @property
    def reserved(self) -> int:
        """The KV-cache tokens the sequence may come to hold."""
        return len(self.prepared.prompt_ids) + self.prepared.max_new_tokens


class SequenceHandle:
    """Lets the front cancel a request; cancelling a finished one does nothing."""

    __slots__ = ("_scheduler", "_seq")

    def __init__(self, scheduler: GenerationScheduler, seq: _Sequence) -> None:
        self._scheduler = scheduler
        self._seq = seq

    @property
    def arrival(self) -> float:
        return self._seq.arrival

    def cancel(self) -> None:
        self._scheduler._cancel(self._seq)


# A prefill batch is padded to its longest prompt. It is split where padding would more than double the work
# (prompts are taken shortest first, so a long one does not drag short ones to its length) and where it would
# pass PREFILL_TOKENS padded tokens (activations and attention grow with it; a longer prompt goes alone).
PREFILL_TOKENS = 8192
# A decoder exported without `logits_positions` returns logits for every prompt position, (B, T, vocab) float32:
# a batch of long prompts on a 50k vocabulary would take gigabytes, so its prefill is also split to keep that
# array under this size.
PREFILL_LOGITS_BYTES = 256 * 1024 * 1024
# With a mixed-step graph, a prompt chunk of at most this many tokens is prefilled in the decode step's call
# (one read of the weights for both: SmolLM2 fp32 on 2 CPU cores saves 18-23 ms a prompt). Longer chunks run
# in calls of their own, which a cancel or a deadline can stop midway; a step's call runs to its end.
MIXED_CHUNK_TOKENS = 256
# Prompts longer than this (in characters) are tokenized in a worker thread rather than on the event loop.
LONG_PROMPT_CHARS = 16 * 1024


def prefill_chunks(
    group: list[_Sequence], vocab_size: int, all_positions: bool = True
) -> list[list[_Sequence]]:
    """Splits the sequences to prefill into batches of similar prompt lengths: at most twice the real tokens
    and PREFILL_TOKENS once padded, and (`all_positions`: the graph returns logits for every prompt position,
    not the last only) logits within PREFILL_LOGITS_BYTES."""
    chunks: list[list[_Sequence]] = []
    current: list[_Sequence] = []
    real = 0
    for seq in sorted(group, key=lambda s: len(s.prepared.prompt_ids)):
        length = len(seq.prepared.prompt_ids)  # the longest so far: the batch's padded width
        padded = (len(current) + 1) * length
        logits = (padded if all_positions else len(current) + 1) * vocab_size * 4
        if current and (
            padded > 2 * (real + length) or padded > PREFILL_TOKENS or logits > PREFILL_LOGITS_BYTES
        ):
            chunks.append(current)
            current, real = [], 0
        current.append(seq)
        real += length
    if current:
        chunks.append(current)
    return chunks


def _ending(seq: _Sequence) -> tuple[str, bool]:
    """The text a sequence still holds when it ends: the detokenizer's last complete characters, then what the
    stop matcher held back (unless those characters complete a stop sequence); and whether they did."""
    text, stopped = seq.stopper.push(seq.detok.flush())
    return (text if stopped else text + seq.stopper.flush()), stopped


def _call_each(pairs: list[tuple[Sink, Event]]) -> None:
    for sink, event in pairs:
        sink(event)


class GenerationScheduler:
    def __init__(
        self,
        model: GeneratorModel,
        *,
        max_active_sequences: int,
        max_queue_size: int,
        metrics: Metrics | None = None,
        prefill_chunk_tokens: int = 0,
        stream_interval: int = 1,
        prefix_caching: bool = True,
    ) -> None:
        self.model = model
        self.name = model.config.name
        self.max_active_sequences = max_active_sequences
        self.max_queue_size = max_queue_size
        # Chunked prefill needs a cache a prompt can be written into piece by piece: the shared buffer's slots.
        # The concatenating cache (GPT-2 exports) prefills each prompt whole.
        self.prefill_chunk_tokens = (
            prefill_chunk_tokens if isinstance(model, SharedBufferGenerator) and prefill_chunk_tokens > 0 else 0
        )
        # A prompt starts from the longest beginning of it that a cache slot holds (slot_cache.py; chunked
        # prefill only: the rest of the prompt is written as chunks are).
        self.prefix_caching = prefix_caching and bool(self.prefill_chunk_tokens)
        # Tokens per chunk sent (vLLM's stream_interval): 1 sends every token as it comes; more send fewer,
        # larger messages (the first token and the last chunk always go at once).
        self.stream_interval = max(1, stream_interval)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._prefilling: list[_Sequence] = []  # admitted, their prompts partly in their slots (chunked prefill)
        self._cache: KVCache | SlotCache | None = None
        # The prompt chunk that goes into this step's decode call (mixed steps): its sequence and its length.
        self._riding: tuple[_Sequence, int] | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._deliver: Deliver = _call_each
        self._m = metrics
        if metrics is not None:
            self._m_queue_depth = metrics.queue_depth.labels(self.name)
            self._m_active = metrics.active_sequences.labels(self.name)
            self._m_queue_time = metrics.queue_duration.labels(self.name, GENERATE)
            self._m_compute = metrics.compute_duration.labels(self.name, GENERATE)
            self._m_batch = metrics.batch_size.labels(self.name, GENERATE)
            self._m_prompt = metrics.prompt_tokens.labels(self.name)
            self._m_cached = metrics.prompt_tokens_cached.labels(self.name)
            self._m_in_decode = metrics.prompt_tokens_in_decode.labels(self.name)
            self._m_generated = metrics.generated_tokens.labels(self.name)
            self._m_prefill = metrics.prefill_duration.labels(self.name)
            self._m_ttft = metrics.time_to_first_token.labels(self.name)
            self._m_itl = metrics.inter_token_latency.labels(self.name)
            self._m_cache_reserved = metrics.kv_cache_reserved.labels(self.name)
            metrics.kv_cache_capacity.labels(self.name).set(model.kv_cache_tokens)

    # -- the front's side ------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Starts the decode thread. With `loop`, sinks are called on that event loop (one hop per step);
        without, in the decode thread itself (in-process use, benchmarks)."""
        if loop is not None:
            self._deliver = lambda pairs: loop.call_soon_threadsafe(_call_each, pairs)
        self._thread = threading.Thread(target=self._run, name=f"decode-{self.name}", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuses new requests, lets the admitted and waiting ones finish, stops the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        """Admitted sequences: decoding, or (chunked prefill) their prompts being written."""
        return len(self._active) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self,
        request: GenerateRequest,
        sink: Sink,
        deadline: float | None = None,
        prepared: PreparedRequest | None = None,
    ) -> SequenceHandle:
        """Validates and queues `request` (`prepared`: already tokenized and checked); its chunks (or one
        exception) go to `sink`. Raises InvalidInput, Overloaded (waiting queue full) or Unavailable (closing)
        at once."""
        prepared = prepared or self.model.prepare(request)
        params = request.params
        seq = _Sequence(
            prepared=prepared,
            sink=sink,
            arrival=time.monotonic(),
            deadline=deadline,
            sampler=Sampler(params, prepared.seed, prepared.prompt_ids),
            detok=IncrementalDetokenizer(self.model.tokenizer, prepared.prompt_ids),
            stopper=StopMatcher(params.stop),
            want_logprobs=params.logprobs,
        )
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if len(self._waiting) >= self.max_queue_size:
                raise Overloaded(f"model {self.name}: {len(self._waiting)} requests waiting (max_queue_size)")
            self._waiting.append(seq)
            self._gauges()
            self._cond.notify()
        return SequenceHandle(self, seq)

    async def stream(
        self, request: GenerateRequest, deadline: float | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """The asyncio front: yields the chunks of one request. Leaving the iteration early (client gone,
        cancelled) cancels the sequence, which leaves the batch at the next step boundary."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        prepared = None
        if request.messages or len(request.prompt) > LONG_PROMPT_CHARS:
            # Tokenizing a prompt of megabytes takes seconds, and so may rendering a conversation of many
            # messages: not on the event loop, which serves everyone.
            prepared = await asyncio.to_thread(self.model.prepare, request)
        handle = self.submit(request, queue.put_nowait, deadline, prepared)
        arrival, last = handle.arrival, 0.0
        try:
            while True:
                chunks = [await queue.get()]
                # A consumer that fell behind (a slow client, a busy event loop) gets the chunks that piled up
                # as one message: fewer, larger messages exactly when sending them is the bottleneck.
                while (
                    not queue.empty()
                    and isinstance(chunks[-1], GenerationChunk)
                    and chunks[-1].finish is None
                ):
                    chunks.append(queue.get_nowait())
                error = chunks.pop() if isinstance(chunks[-1], BaseException) else None
                if chunks:
                    chunk = chunks[0] if len(chunks) == 1 else join_chunks(chunks)
                    if chunk.token_ids:
                        last = self._delivered(len(chunk.token_ids), arrival, last)
                    yield chunk
                    if chunk.finish is not None:
                        return
                if error is not None:
                    raise error
        finally:
            handle.cancel()

    async def generate(self, request: GenerateRequest, deadline: float | None = None) -> GenerationChunk:
        """The unary result: the stream's chunks joined."""
        return join_chunks([chunk async for chunk in self.stream(request, deadline)])

    def _delivered(self, tokens: int, arrival: float, last: float) -> float:
        """Observes time to first token and inter-token latency as the front receives `tokens` tokens (what its
        client will see, joined chunks included: tokens that arrive together are 0 s apart); returns now."""
        now = time.monotonic()
        if self._m is not None:
            if not last:
                self._m_ttft.observe(now - arrival)
            else:
                self._m_itl.observe(now - last)
            for _ in range(tokens - 1):
                self._m_itl.observe(0.0)
        return now

    def _cancel(self, seq: _Sequence) -> None:
        if seq.finished:
            return  # every stream cancels its handle when it ends: nothing to look for
        seq.cancelled = True
        interrupt = seq.interrupt
        if interrupt is not None:  # a chunk of its prompt is running: stop it now, not when it ends
            interrupt.fire()
        with self._cond:
            try:
                self._waiting.remove(seq)  # still queued: it never costs a step
            except ValueError:
                return  # active (leaves at the next boundary) or already gone
            self._gauges()

    def _gauges(self) -> None:
        if self._m is not None:
            self._m_queue_depth.set(len(self._waiting))
            self._m_active.set(len(self._active) + len(self._prefilling))

    # -- the decode thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._prefilling:
                    if self._closed:
                        return
                    self._cond.wait()
                admitted = self._admit()
            events: list[tuple[Sink, Event]] = []
            try:
                self._iterate(admitted, events)
            except Exception as exc:  # a bug, not a model error: fail what is running, keep the thread alive
                log.exception("model %s: the scheduler failed; failing the running sequences", self.name)
                running = [s for s in {*self._active, *self._prefilling, *admitted} if not s.finished]
                events.extend((seq.sink, exc) for seq in running)  # keep what finished before it
                self._drop_batch()
            with self._cond:
                self._gauges()
            if self._m is not None:
                self._m_cache_reserved.set(self.model.reserved_tokens(self._reservations()))
            if events:
                self._deliver(events)

    def _reservations(self) -> list[int]:
        """What each admitted sequence reserves of the KV cache (those cancelled leave at the next boundary)."""
        return [s.reserved for s in (*self._active, *self._prefilling) if not s.cancelled]

    def _admit(self) -> list[_Sequence]:
        """Waiting requests that fit beside the running batch (under the lock), in order of arrival: within
        max_active_sequences, and their reservations within the KV cache (the first that does not fit waits,
        and nothing overtakes it). Rows cancelled since the last step leave at this boundary, before the
        prefill, so their slots count as free already."""
        if not self._waiting:
            return []
        reservations = self._reservations()
        admitted = []
        while self._waiting and len(reservations) < self.max_active_sequences:
            seq = self._waiting[0]
            if self.model.reserved_tokens([*reservations, seq.reserved]) > self.model.kv_cache_tokens:
                break
            reservations.append(seq.reserved)
            admitted.append(self._waiting.popleft())
        return admitted

    def _iterate(self, admitted: list[_Sequence], events: list[tuple[Sink, Event]]) -> None:
        """One step boundary: leave, join (prefill), one decode step."""
        self._leave(events)
        if admitted or self._prefilling:
            if self.prefill_chunk_tokens:
                self._prefill_chunked(admitted, events)
            else:
                self._prefill(admitted, events)
            if events:  # first tokens go out now, not after the decode step
                self._deliver(events[:])  # a copy: delivery may happen later, on the event loop
                events.clear()
        if self._active:
            try:
                self._step(events)
            except Exception as exc:  # fails the sequences of this step (and the prompts being written: the
                # pool is reset with the batch)
                log.exception("model %s: a decode step of %d sequences failed", self.name, len(self._active))
                events.extend((seq.sink, exc) for seq in (*self._active, *self._prefilling))
                self._drop_batch()

    def _drop_batch(self) -> None:
        """Forgets the running batch (after a failure): its sequences and every cached row."""
        self._active, self._cache, self._prefilling, self._riding = [], None, [], None
        self.model.reset()

    def _leave(self, events: list[tuple[Sink, Event]]) -> None:
        """Drops cancelled and expired sequences from the running batch (at a step boundary)."""
        now = time.monotonic()

        def expire(seq: _Sequence, during: str) -> None:
            if seq.deadline is not None and now >= seq.deadline and not seq.cancelled:
                events.append((seq.sink, DeadlineExceeded(f"the deadline passed during {during}")))
                seq.cancelled = True

        keep = []
        for row, seq in enumerate(self._active):
            expire(seq, "generation")
            if not seq.cancelled:
                keep.append(row)
        writing = []
        for seq in self._prefilling:
            expire(seq, "the prompt's prefill")
            if seq.cancelled:
                self.model.pool.release([seq.slot])
            else:
                writing.append(seq)
        if len(keep) < len(self._active) or len(writing) < len(self._prefilling):
            if len(keep) < len(self._active):
                self._active = [self._active[r] for r in keep]
                self._cache = self._cache.select(keep)
            self._prefilling = writing
            with self._cond:
                self._gauges()

    def _start(self, admitted: list[_Sequence], events: list[tuple[Sink, Event]]) -> list[_Sequence]:
        """The admitted sequences that start their prefill now (not cancelled, deadline not passed)."""
        now = time.monotonic()
        group = []
        for seq in admitted:
            if seq.cancelled:
                continue
            if seq.deadline is not None and now >= seq.deadline:
                events.append(
                    (seq.sink, DeadlineExceeded("the deadline passed while the request was queued"))
                )
                continue
            seq.started = now
            group.append(seq)
        if self._m is not None and group:
            for seq in group:
                self._m_queue_time.observe(now - seq.arrival)
            self._m_prompt.inc(sum(len(s.prepared.prompt_ids) for s in group))
        return group

    def _join(self, seqs: list[_Sequence], logits, cache: KVCache | SlotCache, events) -> None:
        """Sequences whose prompts are in `cache` sample their first token and join the running batch."""
        for seq in seqs:
            seq.position = len(seq.prepared.prompt_ids)
        keep = self._accept(seqs, logits, events)
        cache = cache.select(keep)  # frees what ended at its first token
        if keep:
            self._cache = cache if self._cache is None else type(cache).join(self._cache, cache)
            self._active.extend(seqs[r] for r in keep)

    def _prefill(self, admitted: list[_Sequence], events: list[tuple[Sink, Event]]) -> None:
        group = self._start(admitted, events)
        if not group:
            return
        for chunk in prefill_chunks(group, self.model.vocab_size, not self.model.last_logits_only):
            started = time.monotonic()
            try:
                logits, cache = self.model.prefill([s.prepared.prompt_ids for s in chunk])
            except Exception as exc:  # fails the sequences of this prefill only
                log.exception("model %s: a prefill of %d sequences failed", self.name, len(chunk))
                events.extend((seq.sink, exc) for seq in chunk)
                continue
            if self._m is not None:
                self._m_prefill.observe(time.monotonic() - started)
            self._join(chunk, logits, cache, events)
        with self._cond:
            self._gauges()

    def _prefill_chunked(self, admitted: list[_Sequence], events: list[tuple[Sink, Event]]) -> None:
        """At most `prefill_chunk_tokens` prompt tokens this step, in order of arrival: the sequences whose
        prompts complete join the batch; the one cut by the budget goes on at the next step."""
        model = self.model
        assert isinstance(model, SharedBufferGenerator)
        for seq in self._start(admitted, events):
            seq.slot = model.pool.take()  # admission keeps sequences within the slots: never Overloaded
            if self.prefix_caching:
                seq.prefilled = model.pool.reuse(seq.slot, seq.prepared.prompt_ids)
                if self._m is not None:
                    self._m_cached.inc(seq.prefilled)
            self._prefilling.append(seq)
        budget = self.prefill_chunk_tokens
        while budget > 0 and self._prefilling:
            group = self._prefill_group(budget)
            if len(group) > 1:
                budget -= self._prefill_together(group, events)
                continue
            seq = self._prefilling[0]
            ids = seq.prepared.prompt_ids
            n = min(len(ids) - seq.prefilled, budget)
            if self._active and model.mixed is not None and n <= MIXED_CHUNK_TOKENS:
                self._riding = (seq, n)  # written by the decode step's call
                break
            started = time.monotonic()
            try:
                logits = self._run_chunk(seq, ids[seq.prefilled : seq.prefilled + n])
            except Exception as exc:  # ends this sequence only
                self._prefilling.pop(0)
                model.pool.release([seq.slot])
                if not isinstance(exc, Interrupted):
                    log.exception("model %s: a prefill chunk of %d tokens failed", self.name, n)
                    events.append((seq.sink, exc))
                elif not seq.cancelled:  # the deadline's timer, not the client
                    seq.cancelled = True
                    events.append((seq.sink, DeadlineExceeded("the deadline passed during the prompt's prefill")))
                continue
            seq.prefill_seconds += time.monotonic() - started
            seq.prefilled += n
            budget -= n
            if seq.prefilled < len(ids):
                break  # the budget is spent; the rest at the next step
            self._prefilling.pop(0)
            if self._m is not None:
                self._m_prefill.observe(seq.prefill_seconds)
            self._join([seq], logits, SlotCache(model.pool, [seq.slot], [len(ids)]), events)
        with self._cond:
            self._gauges()

    def _prefill_group(self, budget: int) -> list[_Sequence]:
        """The prompts at the head of the prefill queue that one call writes whole within `budget` tokens (of
        one length, not begun, in neighbouring slots: `batchable`); the head alone when fewer than two are not
        begun. Not begun: ONNX Runtime's GroupQueryAttention (CPU) takes several rows of several tokens only
        without past tokens, so a prompt with a prefix from the cache is written alone."""
        candidates = list(itertools.takewhile(lambda s: not s.prefilled, self._prefilling))
        if len(candidates) < 2:
            return self._prefilling[:1]
        n = batchable([len(s.prepared.prompt_ids) for s in candidates], [s.slot for s in candidates], budget)
        return candidates[:n]

    def _prefill_together(self, group: list[_Sequence], events: list[tuple[Sink, Event]]) -> int:
        """Writes the prompts of `group` (the head of the prefill queue) in one call; they join the batch.
        Such a call is not interrupted: a cancel or a deadline takes effect when it ends (within the step's
        budget of tokens), as for a decode step. Returns the prompt tokens written."""
        model = self.model
        assert isinstance(model, SharedBufferGenerator)
        del self._prefilling[: len(group)]
        slots = [s.slot for s in group]
        lengths = [len(s.prepared.prompt_ids) for s in group]
        started = time.monotonic()
        try:
            logits = model.prefill_rows(slots[0], [s.prepared.prompt_ids for s in group])
        except Exception as exc:  # ends these sequences only
            log.exception("model %s: a prefill of %d prompts failed", self.name, len(group))
            model.pool.release(slots)
            events.extend((seq.sink, exc) for seq in group)
            return sum(lengths)
        elapsed = time.monotonic() - started
        for seq, length in zip(group, lengths):
            seq.prefill_seconds += elapsed
            seq.prefilled = length
            if self._m is not None:
                self._m_prefill.observe(seq.prefill_seconds)
        self._join(group, logits, SlotCache(model.pool, slots, lengths), events)
        return sum(lengths)

    def _run_chunk(self, seq: _Sequence, ids: list[int]) -> np.ndarray:
        """One chunk of `seq`'s prompt into its slot, stopped midway (Interrupted) by a cancel or its deadline."""
        model = self.model
        assert isinstance(model, SharedBufferGenerator)
        interrupt = seq.interrupt = Interrupt()
        if seq.cancelled:  # cancelled since the boundary, before the interrupt was there to fire
            interrupt.fire()
        timer = None
        if seq.deadline is not None:
            timer = threading.Timer(max(0.0, seq.deadline - time.monotonic()), interrupt.fire)
            timer.daemon = True
            timer.start()
        try:
            return model.prefill_chunk(seq.slot, ids, seq.prefilled, interrupt)
        finally:
            seq.interrupt = None
            if timer is not None:
                timer.cancel()

    def _step(self, events: list[tuple[Sink, Event]]) -> None:
        start = time.monotonic()
        active = self._active
        tokens = [s.last_id for s in active]
        riding, self._riding = self._riding, None
        if riding is None:
            logits, cache = self.model.decode(tokens, [s.position for s in active], self._cache)
        else:
            seq, n = riding
            ids = seq.prepared.prompt_ids[seq.prefilled : seq.prefilled + n]
            model = self.model
            assert isinstance(model, SharedBufferGenerator)
            logits, cache, chunk_logits = model.decode_with_chunk(tokens, self._cache, seq.slot, ids, seq.prefilled)
        for seq in active:
            seq.position += 1
        keep = self._accept(active, logits, events)
        if len(keep) < len(active):
            self._active = [active[r] for r in keep]
            cache = cache.select(keep)
        self._cache = cache
        if self._m is not None:
            self._m_compute.observe(time.monotonic() - start)
            self._m_batch.observe(len(active))
        if riding is not None:
            self._rode(*riding, chunk_logits, time.monotonic() - start, events)

    def _rode(self, seq: _Sequence, n: int, logits: np.ndarray | DeviceLogits, seconds: float, events) -> None:
        """The chunk of `seq`'s prompt that went into the step's call is written: the sequence joins the batch
        when its prompt is complete."""
        seq.prefill_seconds += seconds
        seq.prefilled += n
        if self._m is not None:
            self._m_in_decode.inc(n)
        if seq.prefilled < len(seq.prepared.prompt_ids):
            return
        self._prefilling.remove(seq)
        if self._m is not None:
            self._m_prefill.observe(seq.prefill_seconds)
        self._join([seq], logits, SlotCache(self.model.pool, [seq.slot], [seq.prefilled]), events)
        with self._cond:
            self._gauges()

    def _accept(self, seqs: list[_Sequence], logits, events: list[tuple[Sink, Event]]) -> list[int]:
        """Samples each sequence's next token, emits its text; returns the rows that go on. A row whose logits
        hold NaN or +inf has no next token (argmax would return garbage): that sequence fails alone."""
        broken = ~finite_rows(logits, [s.sampler for s in seqs])
        if not broken.any():
            return self._accept_rows(seqs, logits, events)
        for row in np.flatnonzero(broken):
            log.error("model %s: non-finite logits for a sequence at position %d", self.name, seqs[row].position)
            seqs[row].finished = True
            events.append((seqs[row].sink, ModelFailure("the model computed non-finite logits (NaN or inf)")))
        good = np.flatnonzero(~broken)
        kept = self._accept_rows([seqs[r] for r in good], logits[good], events)
        return [int(good[r]) for r in kept]

    def _accept_rows(self, seqs: list[_Sequence], logits, events: list[tuple[Sink, Event]]) -> list[int]:
        tokens, logprobs = sample_batch(logits, [s.sampler for s in seqs], [s.want_logprobs for s in seqs])
        now = time.monotonic()
        keep = []
        eos = self.model.eos_ids
        generated = 0
        for row, (seq, token, logprob) in enumerate(zip(seqs, tokens, logprobs)):
            if seq.generated == 0:
                seq.first_token = now
            seq.generated += 1
            seq.last_id = token
            seq.pending_ids.append(token)
            if logprob is not None:
                seq.pending_logprobs.append(logprob)
            finish = None
            if token in eos:
                text, stopped = _ending(seq)
                finish = FinishReason.STOP if stopped else FinishReason.EOS
            else:
                text, stopped = seq.stopper.push(seq.detok.add(token))
                if stopped:
                    finish = FinishReason.STOP
                elif seq.generated >= seq.prepared.max_new_tokens:
                    more, stopped = _ending(seq)
                    text += more
                    finish = FinishReason.STOP if stopped else FinishReason.LENGTH
            if finish is None and seq.cancelled:
                continue  # the client is gone: nothing to send, and the row leaves now
            generated += 1
            text = seq.pending_text + text
            # Held back only once something went out: the first text is never late.
            sent = seq.generated > len(seq.pending_ids)
            held = finish is None and sent and len(seq.pending_ids) < self.stream_interval
            if held:
                seq.pending_text = text
            elif finish is not None or text:
                chunk = GenerationChunk(
                    text, seq.pending_ids, seq.pending_logprobs if seq.want_logprobs else None
                )
                seq.pending_ids, seq.pending_logprobs, seq.pending_text = [], [], ""
                if finish is not None:
                    seq.finished = True
                    chunk.finish = finish
                    chunk.usage = Usage(len(seq.prepared.prompt_ids), seq.generated)
                    chunk.timings = Timings(
                        seq.started - seq.arrival, seq.first_token - seq.arrival, now - seq.arrival
                    )
                events.append((seq.sink, chunk))
            if finish is None:
                keep.append(row)
        if self._m is not None:
            self._m_generated.inc(generated)
        return keep
