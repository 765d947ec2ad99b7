"""The dynamic batcher: generic, a bounded queue, a policy, one blocking call per batch in a worker thread.

Policies:

- ``adaptive`` (the default, no tuning): when the model is idle a batch starts at once with whatever is
  queued; while a batch runs, new requests gather and form the next batch the moment the worker is free. A
  request therefore never waits on purpose: under light load it runs alone with no added latency, under
  heavy load batches grow by themselves to what arrived during one batch's compute. ``max_queue_delay_ms``
  is only an upper bound on deliberate waiting, and this policy waits 0.
- ``fixed`` (Triton's dynamic batcher): a batch is held open until it holds ``max_batch_size`` sequences or
  its oldest request waited ``max_queue_delay_ms``. Kept for the benchmark's comparison.

The batcher knows nothing of gRPC: `run_batch` is a plain function ``list[item] -> list[result | exception]``
(an exception fails only its own request); if it raises, the whole batch fails, and only that batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .config import BatchPolicy
from .errors import DeadlineExceeded, Overloaded, Unavailable
from .metrics import Metrics

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class WorkTimes:
    """Where one request's time went, filled in by the batcher as its batches run: for a front that reports
    per-request statistics (the Open Inference Protocol's ModelStatistics). One object may follow several
    submits (the parts of a large request): the times add up."""

    queue_seconds: float = 0.0  # arrival to the start of its batch
    compute_seconds: float = 0.0  # the whole batch's compute (shared with the requests batched with it)
    batches: list[int] = field(default_factory=list)  # the batcher's numbers of the batches it ran in


@dataclass(eq=False)
class _Entry:
    item: Any
    size: int
    future: asyncio.Future
    arrival: float
    deadline: float | None
    times: WorkTimes | None = None
    # False once the dispatcher took it or its caller went away (the queue-depth count is kept exact).
    queued: bool = field(default=True)


class DynamicBatcher(Generic[Item, Result]):
    """Gathers concurrent `submit` calls into batches of at most `max_batch_size` sequences.

    `size(item)` is the number of sequences an item holds (texts of one request); a single item larger than
    `max_batch_size` still runs, alone (the model splits it). Times are ``time.monotonic()`` seconds.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result | BaseException]],
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        policy: BatchPolicy = BatchPolicy.ADAPTIVE,
        size: Callable[[Item], int] = lambda item: 1,
        name: str = "model",
        method: str = "Classify",
        metrics: Metrics | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.policy = policy
        self._size = size
        self.name = name
        self._queue: collections.deque[_Entry] = collections.deque()
        self._depth = 0
        self._arrived = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task | None = None
        self._batches = 0  # batches run so far (numbers them for WorkTimes)
        # One worker: batches run one after the other, which is what lets requests gather meanwhile. ONNX
        # Runtime parallelises inside a batch with its own intra-op threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        if metrics is not None:
            self._queue_depth = metrics.queue_depth.labels(name)
            self._queue_time = metrics.queue_duration.labels(name, method)
            self._compute_time = metrics.compute_duration.labels(name, method)
            self._batch_size = metrics.batch_size.labels(name, method)
        else:
            self._queue_depth = self._queue_time = self._compute_time = self._batch_size = None

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return self._depth

    def start(self) -> None:
        """Starts the dispatcher on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name=f"batcher-{self.name}")

    async def submit(self, item: Item, deadline: float | None = None, times: WorkTimes | None = None) -> Result:
        """Queues `item` and waits for its result. Raises `Overloaded` at once when the queue is full,
        `DeadlineExceeded` when `deadline` passes before its batch starts; a caller cancelled while queued
        leaves the queue and costs nothing. `times`, when given, gets the item's queue and compute time once
        its batch ran."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        if self._depth >= self.max_queue_size:
            raise Overloaded(f"model {self.name}: {self._depth} requests queued (max_queue_size)")
        entry = _Entry(
            item, self._size(item), asyncio.get_running_loop().create_future(), time.monotonic(), deadline, times
        )
        self._queue.append(entry)
        self._set_depth(+1)
        self._arrived.set()
        try:
            return await entry.future
        finally:
            if entry.queued:  # cancelled (client gone, deadline) while still waiting: forget it now
                entry.queued = False
                self._set_depth(-1)

    async def close(self) -> None:
        """Refuses new requests, finishes the queued ones, stops the worker."""
        self._closed = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def _set_depth(self, delta: int) -> None:
        self._depth += delta
        if self._queue_depth is not None:
            self._queue_depth.set(self._depth)

    async def _dispatch(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            if self.policy is BatchPolicy.FIXED:
                await self._hold_open()
            batch = self._take()
            if batch:
                await self._run(batch)

    async def _hold_open(self) -> None:
        """Fixed policy: waits until a full batch is queued or the oldest request waited max_queue_delay."""
        while not self._closed:
            oldest, total = None, 0
            for entry in self._queue:  # stops as soon as a full batch is queued
                if entry.future.done():
                    continue
                oldest = oldest or entry
                total += entry.size
                if total >= self.max_batch_size:
                    return
            if oldest is None:
                return
            remaining = oldest.arrival + self.max_queue_delay - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Entry]:
        """Pops the next batch, oldest first; drops cancelled requests and those whose deadline passed."""
        batch: list[_Entry] = []
        total = 0
        now = time.monotonic()
        while self._queue:
            entry = self._queue[0]
            if entry.future.done():  # cancelled while queued
                self._queue.popleft()
                continue
            if batch and total + entry.size > self.max_batch_size:
                break
            self._queue.popleft()
            entry.queued = False
            self._set_depth(-1)
            if entry.deadline is not None and now >= entry.deadline:
                entry.future.set_exception(
                    DeadlineExceeded("the deadline passed while the request was queued")
                )
                continue
            batch.append(entry)
            total += entry.size
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        start = time.monotonic()
        if self._queue_time is not None:
            for entry in batch:
                self._queue_time.observe(start - entry.arrival)
            self._batch_size.observe(sum(e.size for e in batch))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            log.exception("model %s: a batch of %d requests failed", self.name, len(batch))
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        finally:
            elapsed = time.monotonic() - start
            if self._compute_time is not None:
                self._compute_time.observe(elapsed)
        self._batches += 1
        for entry in batch:
            if entry.times is not None:
                entry.times.queue_seconds += start - entry.arrival
                entry.times.compute_seconds += elapsed
                entry.times.batches.append(self._batches)
        for entry, result in zip(batch, results):
            if entry.future.done():
                continue
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)
