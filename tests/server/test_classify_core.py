"""The classifier's batch function: length grouping, truncation, per-request failures, batch == alone."""

from __future__ import annotations

import random

import numpy as np
import pytest

from server.classify import pad_batch, plan_groups
from server.errors import InvalidInput
from server.types import ClassifyRequest


@pytest.mark.parametrize("seed", range(5))
def test_groups_cover_every_sequence_once_and_respect_the_cap(seed):
    r = random.Random(seed)
    lengths = [r.randint(1, 128) for _ in range(r.randint(1, 40))]
    groups = plan_groups(lengths, max_group=8)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths)))
    assert all(1 <= len(g) <= 8 for g in groups)


def test_grouping_splits_only_where_it_pays():
    # Eight short texts and one long one: padding the short ones to 120 would cost far more than a second call.
    lengths = [5] * 8 + [120]
    groups = plan_groups(lengths, max_group=32)
    assert sorted(map(sorted, groups)) == [list(range(8)), [8]]
    # Similar lengths stay together: one call.
    assert len(plan_groups([10, 11, 12, 12, 13], max_group=32)) == 1


def test_pad_batch_pads_on_the_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


TEXTS = ["a wonderful, moving film", "dull and far too long", "ok", "the best thing I have seen this year"]


def test_results_come_back_per_request_in_order(classifier):
    requests = [ClassifyRequest("m", tuple(TEXTS[:3])), ClassifyRequest("m", (TEXTS[3],))]
    results = classifier.run(requests)
    assert [len(r) for r in results] == [3, 1]
    labels = classifier.labels
    for r in results[0] + results[1]:
        assert r.label in labels
        assert r.score == pytest.approx(max(r.probabilities))
        assert sum(r.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert r.embedding is None and not r.truncated and r.num_tokens >= 3


def test_batched_equals_alone(classifier):
    together = classifier.run([ClassifyRequest("m", tuple(TEXTS))])[0]
    for text, batched in zip(TEXTS, together):
        alone = classifier.run([ClassifyRequest("m", (text,))])[0][0]
        assert alone.label == batched.label
        np.testing.assert_allclose(alone.probabilities, batched.probabilities, atol=1e-5)


def test_long_text_is_truncated_and_flagged(classifier):
    limit = classifier.config.max_sequence_length
    long_text = "word " * (limit * 2)
    (result,) = classifier.run([ClassifyRequest("m", (long_text,))])[0]
    assert result.truncated and result.num_tokens == limit


def test_no_truncation_fails_only_its_own_request(classifier):
    long_text = "word " * (classifier.config.max_sequence_length * 2)
    strict = ClassifyRequest("m", ("fine", long_text), no_truncation=True)
    lenient = ClassifyRequest("m", (long_text,))
    failed, ok = classifier.run([strict, lenient])
    assert isinstance(failed, InvalidInput) and failed.field == "texts[1]"
    assert ok[0].truncated


def test_embeddings_only_when_asked(classifier):
    if not classifier.has_embedding:
        pytest.skip("this classifier exports no embedding")
    plain, with_vec = classifier.run(
        [ClassifyRequest("m", ("x",)), ClassifyRequest("m", ("y", "z"), return_embedding=True)]
    )
    assert plain[0].embedding is None
    assert [len(r.embedding) for r in with_vec] == [classifier.embedding_size] * 2


@pytest.mark.parametrize(
    "texts, field",
    [((), "texts"), (("ok", ""), "texts[1]"), (("x",) * 17, "texts")],
)
def test_validation_names_the_field(classifier, texts, field):
    with pytest.raises(InvalidInput) as exc:
        classifier.validate(ClassifyRequest("m", texts))
    assert exc.value.field == field


def test_io_binding_path_gives_the_same_results(classifier, classifier_config):
    # CUDA's IO binding path, forced on the CPU.
    from server.classify import ClassifierModel
    from server.config import Device
    from server.runtime import Session

    session = Session(classifier_config.model_file("fp32")[1], Device.CPU, io_binding=True)
    bound = ClassifierModel(classifier_config, session, max_texts_per_request=16, max_batch_size=4)
    plain = classifier.run([ClassifyRequest("m", tuple(TEXTS), return_embedding=classifier.has_embedding)])[0]
    via_binding = bound.run([ClassifyRequest("m", tuple(TEXTS), return_embedding=classifier.has_embedding)])[
        0
    ]
    for a, b in zip(plain, via_binding):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
        assert a.embedding == pytest.approx(b.embedding) if a.embedding else b.embedding is None
