"""The per-model inference statistics of the Open Inference Protocol front (Triton's ModelStatistics), kept by
the front for the requests it served: plain counters, no gRPC.

Each request is timed where its time goes: `compute_input` is the front turning tensors into a request,
`queue` and `compute_infer` are what the core measured (the batcher: arrival to the start of the request's
batch, and that whole batch's compute, tokenization included, as Triton counts a batch for each request in
it; the scheduler: arrival to prefill, and prefill to the last token), `compute_output` is the front turning
results into response tensors; `success` is arrival to the end of the call (the last response, for a
stream). `inference_count` counts texts (encoders) or generations; `execution_count` counts the distinct
batches those requests ran in (encoders: requests batched together are one execution, as in Triton) or
generations (one each: a decoupled model's execution is the whole sequence).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

NS = 1_000_000_000
# Batch numbers remembered per model to count each batch once; requests finish within a few batches of theirs.
SEEN_BATCHES = 4096


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * NS))


@dataclass(eq=False)
class RequestTimes:
    """What one request spent where; the front fills it in as the request runs, then calls `finish`."""

    counters: ModelCounters
    input_seconds: float = 0.0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    output_seconds: float = 0.0
    inferences: int = 0
    batches: list[int] = field(default_factory=list)  # the batcher's batch numbers; empty: one execution

    def finish(self, ok: bool, seconds: float) -> None:
        """Counts the request (the signature of status.Call.on_finish)."""
        self.counters.add(self, ok, seconds)


@dataclass(eq=False)
class ModelCounters:
    version: str
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    _seen: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SEEN_BATCHES))
    _seen_set: set[int] = field(default_factory=set)

    def add(self, times: RequestTimes, ok: bool, seconds: float) -> None:
        if not ok:
            self.fail.add(seconds)
            return
        self.success.add(seconds)
        self.queue.add(times.queue_seconds)
        self.compute_input.add(times.input_seconds)
        self.compute_infer.add(times.compute_seconds)
        self.compute_output.add(times.output_seconds)
        self.inference_count += times.inferences
        self.execution_count += self._new_batches(times.batches) if times.batches else 1
        self.last_inference_ms = int(time.time() * 1000)

    def _new_batches(self, batches: list[int]) -> int:
        new = 0
        for batch in batches:
            if batch in self._seen_set:
                continue
            if len(self._seen) == self._seen.maxlen:
                self._seen_set.discard(self._seen[0])
            self._seen.append(batch)
            self._seen_set.add(batch)
            new += 1
        return new


class Statistics:
    """Counters per model name (all on the event loop's thread: no lock)."""

    def __init__(self) -> None:
        self.models: dict[str, ModelCounters] = {}

    def of(self, name: str, version: str) -> ModelCounters:
        counters = self.models.get(name)
        if counters is None:
            counters = self.models[name] = ModelCounters(version)
        return counters

    def start(self, name: str, version: str) -> RequestTimes:
        return RequestTimes(self.of(name, version))
