"""Classify and the model listing, end to end: the real server on port 0, raw stubs over loopback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from e2e_util import sample, scrape, start

from client.proto import inference_pb2 as pb
from client.proto import inference_pb2_grpc

TEXTS = ["a moving, beautiful film", "boring and far too long", "fine", "I would watch it again tomorrow"]


@pytest.fixture(scope="module")
def srv(models):
    # Small limits so that the limit tests stay small: 8 texts per request, 64 KiB messages.
    with start(models, "--max-texts-per-request", "8", "--max-message-bytes", "65536") as running:
        yield running


def classify(stub, texts, **kw) -> pb.ClassifyResponse:
    return stub.Classify(pb.ClassifyRequest(texts=texts, **kw), timeout=30)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code(), exc.value.details()


def test_classify_one_and_many(stub):
    response = classify(stub, TEXTS)
    assert response.model == "sentiment" and response.model_version
    assert len(response.labels) >= 2 and len(response.results) == len(TEXTS)
    for r in response.results:
        assert r.label in response.labels
        assert len(r.probabilities) == len(response.labels)
        assert sum(r.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert r.score == pytest.approx(max(r.probabilities))
        assert r.label == response.labels[list(r.probabilities).index(max(r.probabilities))]
        assert not r.truncated and r.num_tokens > 0 and not r.embedding
    # Order is kept, and a text gets the same answer alone as in company.
    for text, together in zip(TEXTS, response.results):
        alone = classify(stub, [text], model="sentiment").results[0]
        assert alone.label == together.label
        assert list(alone.probabilities) == pytest.approx(list(together.probabilities), abs=1e-5)


def test_concurrent_requests_are_batched_and_all_answered(stub, srv):
    before = scrape(srv)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: classify(stub, TEXTS[: 1 + i % 4]), range(32)))
    after = scrape(srv)
    assert [len(r.results) for r in responses] == [1 + i % 4 for i in range(32)]
    labels = {"model": "sentiment", "method": "Classify"}
    sent = sum(1 + i % 4 for i in range(32))
    assert (
        sample(after, "nlpserve_batch_size_sum", **labels)
        - sample(before, "nlpserve_batch_size_sum", **labels)
        == sent
    )
    batches = sample(after, "nlpserve_batch_size_count", **labels) - sample(
        before, "nlpserve_batch_size_count", **labels
    )
    assert 1 <= batches <= 32
    ok = {"model": "sentiment", "method": "Classify", "code": "OK"}
    assert (
        sample(after, "nlpserve_requests_total", **ok) - sample(before, "nlpserve_requests_total", **ok) == 32
    )


def test_long_text_is_truncated_and_flagged_or_refused(stub):
    long_text = "word " * 2000
    result = classify(stub, ["short", long_text]).results
    assert not result[0].truncated and result[1].truncated
    code, details = code_of(lambda: classify(stub, ["short", long_text], no_truncation=True))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "texts[1]" in details


def test_embedding_on_request(stub):
    info = stub.GetModel(pb.GetModelRequest(name="sentiment"))
    response = classify(stub, TEXTS[:2], return_embedding=True)
    if info.embedding_size == 0:
        pytest.skip("this classifier exports no embedding")
    assert [len(r.embedding) for r in response.results] == [info.embedding_size] * 2


@pytest.mark.parametrize(
    "request_kw, code, field",
    [
        ({"texts": []}, grpc.StatusCode.INVALID_ARGUMENT, "texts"),
        ({"texts": ["ok", ""]}, grpc.StatusCode.INVALID_ARGUMENT, "texts[1]"),
        ({"texts": ["x"] * 9}, grpc.StatusCode.INVALID_ARGUMENT, "texts"),
        ({"texts": ["x"], "model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ({"texts": ["x"], "model": "docgpt"}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ],
)
def test_bad_input_gets_a_clear_status(stub, request_kw, code, field):
    got, details = code_of(lambda: stub.Classify(pb.ClassifyRequest(**request_kw), timeout=30))
    assert got is code and field in details
    assert classify(stub, ["still serving"]).results  # and the server keeps serving


def test_message_size_limit(stub):
    got, _ = code_of(lambda: classify(stub, ["x" * 100_000]))
    assert got is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert classify(stub, ["still serving"]).results


def test_list_and_get_models(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert set(models) >= {"sentiment", "docgpt"}
    c, g = models["sentiment"], models["docgpt"]
    assert c.kind == pb.MODEL_KIND_CLASSIFIER and g.kind == pb.MODEL_KIND_GENERATOR
    assert c.ready and g.ready
    # No GPU here: the provider really in use is the CPU one, whatever --device auto asked for.
    assert c.execution_provider == g.execution_provider == "CPUExecutionProvider"
    assert c.variant == "fp32" and c.labels and c.limits.max_texts_per_request == 8
    assert (
        c.batching.policy == "adaptive" and c.batching.max_batch_size >= 1 and c.batching.max_queue_size >= 1
    )
    assert g.batching.policy == "continuous" and g.batching.max_active_sequences >= 1
    assert (
        g.limits.max_new_tokens >= g.limits.default_max_new_tokens >= 1 and g.limits.max_stop_sequences == 8
    )
    assert stub.GetModel(pb.GetModelRequest(name="docgpt"), timeout=30) == g
    got, details = code_of(lambda: stub.GetModel(pb.GetModelRequest(name="nope"), timeout=30))
    assert got is grpc.StatusCode.NOT_FOUND and "nope" in details


def test_an_unknown_name_is_not_echoed_whole(stub):
    name = "x" * 30_000  # whole, its status would pass the client's 8 KiB metadata limit (RESOURCE_EXHAUSTED)
    for call in (lambda: stub.GetModel(pb.GetModelRequest(name=name), timeout=30),
                 lambda: stub.Classify(pb.ClassifyRequest(model=name, texts=["hi"]), timeout=30)):
        got, details = code_of(call)
        assert got is grpc.StatusCode.NOT_FOUND
        assert "xxxx" in details and "30000 characters" in details and len(details) < 200


def test_reflection_lists_the_services(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    names = {s.name for s in response.list_services_response.service}
    assert {"nlpserve.v1.InferenceService", "grpc.health.v1.Health"} <= names
    assert inference_pb2_grpc.InferenceServiceStub  # the same contract the stubs were generated from
