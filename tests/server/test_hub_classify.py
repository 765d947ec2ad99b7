"""ModelHub.classify sends a request of more texts than a batch holds in batch-sized parts, one after the
other: the answer is the same as in one piece, errors name the text of the whole request, and a request that
arrives meanwhile is batched between the parts instead of waiting for all of them."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.batching import DynamicBatcher
from server.errors import InvalidInput
from server.models import ModelHub, ServedModel
from server.types import ClassifyRequest, ModelDescription

TEXTS = tuple(f"a {'fine' if i % 2 else 'dull'} film, take {i}" for i in range(10))


def hub_of(classifier, run) -> tuple[ModelHub, ServedModel]:
    batcher = DynamicBatcher(
        run, max_batch_size=4, max_queue_delay_ms=0, max_queue_size=64, size=lambda r: len(r.texts)
    )
    description = ModelDescription(
        name="m", version="1", kind="classifier", provider="CPUExecutionProvider", variant="fp32",
        max_sequence_length=classifier.config.max_sequence_length, policy="adaptive", max_queue_size=64,
    )
    hub = ModelHub()
    served = ServedModel(description, encoder=classifier, batcher=batcher, ready=True)
    hub.add(served)
    return hub, served


def test_parts_answer_like_one_piece_and_errors_count_from_the_request(classifier):
    async def main() -> None:
        hub, served = hub_of(classifier, classifier.run)
        served.batcher.start()
        try:
            result = await hub.classify(served, ClassifyRequest("m", TEXTS), None)
            (whole,) = classifier.run([ClassifyRequest("m", TEXTS)])
            parts = [p for c in result.results for p in c.probabilities]
            assert parts == pytest.approx([p for c in whole for p in c.probabilities], abs=1e-6)
            assert [c.label for c in result.results] == [c.label for c in whole]
            too_long = (*TEXTS[:9], "film " * 1000)
            with pytest.raises(InvalidInput) as info:
                await hub.classify(served, ClassifyRequest("m", too_long, no_truncation=True), None)
            assert info.value.field == "texts[9]" and str(info.value).startswith("texts[9]: longer than")
        finally:
            await served.batcher.close()

    asyncio.run(main())


def test_a_request_arriving_meanwhile_is_batched_between_the_parts(classifier):
    batches: list[list[ClassifyRequest]] = []
    first_started = threading.Event()
    release = threading.Event()

    def run(requests):  # the real model, recording what each batch held
        batches.append(list(requests))
        first_started.set()
        release.wait(30)  # the first batch waits until the small request is queued
        return classifier.run(requests)

    async def main() -> None:
        hub, served = hub_of(classifier, run)
        served.batcher.start()
        try:
            big = asyncio.ensure_future(hub.classify(served, ClassifyRequest("m", TEXTS), None))
            await asyncio.to_thread(first_started.wait, 30)
            small = asyncio.ensure_future(hub.classify(served, ClassifyRequest("m", ("small",)), None))
            await asyncio.sleep(0)  # queued
            release.set()
            await asyncio.gather(big, small)
        finally:
            await served.batcher.close()

    asyncio.run(main())
    batch_of = {r.texts: i for i, batch in enumerate(batches) for r in batch}
    assert batch_of[("small",)] <= batch_of[TEXTS[8:]]  # not after the whole big request
    assert sorted(len(r.texts) for b in batches for r in b if r.texts != ("small",)) == [2, 4, 4]
