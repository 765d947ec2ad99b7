"""The dynamic batcher on its own: a plain Python run_batch, no model, no gRPC.

Batch boundaries are made deterministic by holding the worker on a threading.Event (no sleeps, no timing)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from server.batching import DynamicBatcher
from server.config import BatchPolicy
from server.errors import DeadlineExceeded, Overloaded, Unavailable
from server.metrics import Metrics


class Recorder:
    """run_batch that records its batches; the first `hold` batches wait until released."""

    def __init__(self, hold: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.hold = hold

    def __call__(self, items: list[str]) -> list[object]:
        self.batches.append(list(items))
        if len(self.batches) <= self.hold:
            self.started.set()
            assert self.release.wait(30)
        return [ValueError(f"bad {x}") if x.startswith("bad") else x.upper() for x in items]


def make(run, **kw) -> DynamicBatcher:
    settings = {"max_batch_size": 4, "max_queue_delay_ms": 10_000.0, "max_queue_size": 100, "name": "m"}
    settings.update(kw)
    return DynamicBatcher(run, **settings)


async def wait_started(rec: Recorder) -> None:
    assert await asyncio.to_thread(rec.started.wait, 30)


async def test_idle_model_runs_a_lone_request_at_once():
    # Adaptive: with max_queue_delay_ms at 10 s, a lone request that waited for others would time out here.
    rec = Recorder()
    b = make(rec)
    b.start()
    assert await asyncio.wait_for(b.submit("a"), 5) == "A"
    assert rec.batches == [["a"]]
    await b.close()


async def test_requests_gather_while_a_batch_runs():
    rec = Recorder(hold=1)
    b = make(rec)
    b.start()
    first = asyncio.ensure_future(b.submit("a"))
    await wait_started(rec)  # batch ["a"] runs and blocks
    rest = [asyncio.ensure_future(b.submit(x)) for x in "bcdefg"]
    await asyncio.sleep(0)
    assert b.depth == 6
    rec.release.set()
    assert await first == "A"
    assert await asyncio.gather(*rest) == list("BCDEFG")
    # What queued during the first batch went out in full batches, oldest first.
    assert rec.batches == [["a"], ["b", "c", "d", "e"], ["f", "g"]]
    await b.close()


async def test_batch_capacity_counts_sequences_and_an_oversized_item_runs_alone():
    rec = Recorder(hold=1)
    b = make(rec, size=len)  # an item's size: its length
    b.start()
    first = asyncio.ensure_future(b.submit("x"))
    await wait_started(rec)
    others = [asyncio.ensure_future(b.submit(x)) for x in ("ab", "cd", "e", "abcdefgh", "z")]
    await asyncio.sleep(0)
    rec.release.set()
    await asyncio.gather(first, *others)
    assert rec.batches == [["x"], ["ab", "cd"], ["e"], ["abcdefgh"], ["z"]]
    await b.close()


async def test_fixed_policy_holds_a_batch_until_it_is_full():
    rec = Recorder()
    b = make(rec, policy=BatchPolicy.FIXED)
    b.start()
    futures = []
    for x in "abcd":
        futures.append(asyncio.ensure_future(b.submit(x)))
        await asyncio.sleep(0.01)  # arrivals spread out; the 10 s window keeps the batch open
    assert await asyncio.gather(*futures) == list("ABCD")
    assert rec.batches == [["a", "b", "c", "d"]]
    await b.close()


async def test_fixed_policy_sends_a_partial_batch_after_the_delay():
    rec = Recorder()
    b = make(rec, policy=BatchPolicy.FIXED, max_queue_delay_ms=1.0)
    b.start()
    assert await asyncio.wait_for(b.submit("a"), 5) == "A"
    assert rec.batches == [["a"]]
    await b.close()


async def test_full_queue_is_refused_at_once():
    rec = Recorder(hold=1)
    b = make(rec, max_queue_size=2)
    b.start()
    first = asyncio.ensure_future(b.submit("a"))
    await wait_started(rec)
    queued = [asyncio.ensure_future(b.submit(x)) for x in "bc"]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await b.submit("d")
    rec.release.set()
    assert await asyncio.gather(first, *queued) == ["A", "B", "C"]
    await b.close()


async def test_deadline_passed_while_queued_is_dropped_before_compute():
    rec = Recorder(hold=1)
    b = make(rec)
    b.start()
    first = asyncio.ensure_future(b.submit("a"))
    await wait_started(rec)
    late = asyncio.ensure_future(b.submit("late", deadline=time.monotonic()))  # already due
    ok = asyncio.ensure_future(b.submit("ok"))
    await asyncio.sleep(0)
    rec.release.set()
    with pytest.raises(DeadlineExceeded):
        await late
    assert await first == "A" and await ok == "OK"
    assert ["late"] not in rec.batches and all("late" not in batch for batch in rec.batches)
    await b.close()


async def test_cancelled_while_queued_costs_nothing():
    rec = Recorder(hold=1)
    b = make(rec)
    b.start()
    first = asyncio.ensure_future(b.submit("a"))
    await wait_started(rec)
    gone = asyncio.ensure_future(b.submit("gone"))
    kept = asyncio.ensure_future(b.submit("kept"))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    assert b.depth == 1
    rec.release.set()
    assert await first == "A" and await kept == "KEPT"
    assert all("gone" not in batch for batch in rec.batches)
    await b.close()


async def test_an_item_error_fails_only_its_request():
    rec = Recorder(hold=1)
    b = make(rec)
    b.start()
    first = asyncio.ensure_future(b.submit("a"))
    await wait_started(rec)
    bad = asyncio.ensure_future(b.submit("bad1"))
    good = asyncio.ensure_future(b.submit("good"))
    await asyncio.sleep(0)
    rec.release.set()
    await first
    with pytest.raises(ValueError, match="bad1"):
        await bad
    assert await good == "GOOD"
    assert rec.batches[1] == ["bad1", "good"]  # same batch, different fates
    await b.close()


async def test_a_failing_batch_fails_only_its_own_requests():
    calls = []

    def run(items: list[str]) -> list[str]:
        calls.append(items)
        if "boom" in items:
            raise RuntimeError("the model crashed")
        return [x.upper() for x in items]

    b = make(run, max_batch_size=1)
    b.start()
    with pytest.raises(RuntimeError):
        await b.submit("boom")
    assert await b.submit("after") == "AFTER"  # the batcher keeps serving
    await b.close()


async def test_a_wrong_number_of_results_fails_the_batch():
    b = make(lambda items: items[:-1])
    b.start()
    with pytest.raises(RuntimeError, match="results"):
        await b.submit("a")
    await b.close()


async def test_close_finishes_queued_requests_then_refuses_new_ones():
    rec = Recorder(hold=1)
    b = make(rec)
    b.start()
    first = asyncio.ensure_future(b.submit("a"))
    await wait_started(rec)
    queued = asyncio.ensure_future(b.submit("b"))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(b.close())
    await asyncio.sleep(0)
    with pytest.raises(Unavailable):
        await b.submit("c")
    rec.release.set()
    await closing
    assert await first == "A" and await queued == "B"


async def test_metrics_see_batches_and_queue_depth():
    registry = CollectorRegistry()
    rec = Recorder(hold=1)
    b = make(rec, metrics=Metrics(registry), method="Classify")
    b.start()
    first = asyncio.ensure_future(b.submit("a"))
    await wait_started(rec)
    rest = [asyncio.ensure_future(b.submit(x)) for x in "bc"]
    await asyncio.sleep(0)
    assert registry.get_sample_value("nlpserve_queue_depth", {"model": "m"}) == 2
    rec.release.set()
    await asyncio.gather(first, *rest)
    labels = {"model": "m", "method": "Classify"}
    assert registry.get_sample_value("nlpserve_queue_depth", {"model": "m"}) == 0
    assert registry.get_sample_value("nlpserve_batch_size_count", labels) == 2
    assert registry.get_sample_value("nlpserve_batch_size_sum", labels) == 3
    assert registry.get_sample_value("nlpserve_queue_duration_seconds_count", labels) == 3
    assert registry.get_sample_value("nlpserve_compute_duration_seconds_count", labels) == 2
    await b.close()
