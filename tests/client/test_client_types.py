"""Results built from protos, requests built from arguments, and the health messages: no server needed."""

from __future__ import annotations

import json
import math

import pytest

from client import (
    Classification,
    ClassifyResult,
    FinishReason,
    Generation,
    GenerationChunk,
    ModelInfo,
    ModelKind,
    Timings,
    Usage,
)
from client import _requests as req
from client.proto import inference_pb2 as pb


def _classify_response() -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model="sentiment",
        model_version="3",
        labels=["negative", "positive"],
        results=[
            pb.Classification(label="positive", score=0.75, probabilities=[0.25, 0.75], num_tokens=5),
            pb.Classification(
                label="negative",
                score=0.5,
                probabilities=[0.5, 0.5],
                truncated=True,
                num_tokens=128,
                embedding=[0.5, -1.0, 2.0],
            ),
        ],
    )


def test_classify_result_maps_probabilities_to_labels():
    result = ClassifyResult.from_pb(_classify_response())
    assert (result.model, result.model_version, result.labels) == ("sentiment", "3", ["negative", "positive"])
    assert len(result) == 2
    first, second = result
    assert first == Classification("positive", 0.75, {"negative": 0.25, "positive": 0.75}, False, 5, None)
    assert second.truncated and second.num_tokens == 128
    assert second.embedding == [0.5, -1.0, 2.0]
    assert result[1] is second


def test_classify_result_embedding_is_a_list_when_asked_for_even_if_empty():
    result = ClassifyResult.from_pb(_classify_response(), with_embedding=True)
    assert result[0].embedding == []


def test_classification_rejects_probabilities_that_do_not_match_the_labels():
    msg = pb.Classification(label="a", score=1.0, probabilities=[1.0])
    with pytest.raises(ValueError, match="1 probabilities for 2 labels"):
        Classification.from_pb(msg, ["a", "b"])


def _last_message(**kw) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=kw.get("text", "!"),
        token_ids=kw.get("token_ids", [9]),
        logprobs=kw.get("logprobs", [-0.5]),
        finish_reason=kw.get("finish_reason", pb.FINISH_REASON_STOP),
        usage=pb.Usage(prompt_tokens=4, generated_tokens=3),
        timings=pb.Timings(queue_seconds=0.25, time_to_first_token_seconds=0.5, total_seconds=1.0),
        model="docgpt",
        model_version="1",
    )


def test_generation_from_unary_response():
    gen = Generation.from_pb(_last_message(text="hello", token_ids=[1, 2, 3], logprobs=[-1, -2, -3]))
    assert gen.text == "hello" and gen.token_ids == [1, 2, 3] and gen.logprobs == [-1.0, -2.0, -3.0]
    assert gen.finish_reason is FinishReason.STOP and gen.finish_reason == "stop"
    assert gen.usage == Usage(4, 3) and gen.usage.total_tokens == 7
    assert gen.timings == Timings(0.25, 0.5, 1.0)
    assert (gen.model, gen.model_version) == ("docgpt", "1")


@pytest.mark.parametrize(
    ("value", "reason"),
    [(pb.FINISH_REASON_LENGTH, "length"), (pb.FINISH_REASON_STOP, "stop"), (pb.FINISH_REASON_EOS, "eos")],
)
def test_every_finish_reason_reads_as_its_name(value, reason):
    assert Generation.from_pb(_last_message(finish_reason=value)).finish_reason.value == reason


def test_a_unary_answer_without_finish_reason_is_refused():
    with pytest.raises(ValueError, match="no finish reason"):
        Generation.from_pb(pb.GenerateResponse(text="x"))


def test_stream_chunks_carry_the_summary_only_at_the_end():
    middle = GenerationChunk.from_pb(pb.GenerateResponse(text="He", token_ids=[5, 6], model="docgpt"))
    assert middle.finish_reason is None and middle.usage is None and middle.timings is None
    assert not middle.is_last
    last = GenerationChunk.from_pb(_last_message())
    assert last.is_last and last.usage == Usage(4, 3) and last.timings.total_seconds == 1.0


def test_generation_from_chunks_equals_the_concatenation():
    chunks = [
        GenerationChunk.from_pb(pb.GenerateResponse(text="He", token_ids=[5, 6], logprobs=[-1, -2])),
        GenerationChunk.from_pb(
            pb.GenerateResponse(text="", token_ids=[7], logprobs=[-3])
        ),  # half a character
        GenerationChunk.from_pb(_last_message(text="é!", token_ids=[8, 9], logprobs=[-4, -5])),
    ]
    gen = Generation.from_chunks(chunks)
    assert gen.text == "Heé!" and gen.token_ids == [5, 6, 7, 8, 9]
    assert gen.logprobs == [-1, -2, -3, -4, -5]
    assert gen.finish_reason == "stop" and gen.usage == Usage(4, 3)
    with pytest.raises(ValueError, match="incomplete"):
        Generation.from_chunks(chunks[:2])


def test_to_dict_is_json_with_enums_as_strings():
    gen = Generation.from_pb(_last_message())
    data = json.loads(json.dumps(gen.to_dict()))
    assert data["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 4, "generated_tokens": 3}
    assert data["timings"]["time_to_first_token_seconds"] == 0.5
    chunk = json.loads(json.dumps(GenerationChunk.from_pb(pb.GenerateResponse(text="a")).to_dict()))
    assert chunk["finish_reason"] is None and chunk["usage"] is None and chunk["text"] == "a"
    result = json.loads(json.dumps(ClassifyResult.from_pb(_classify_response()).to_dict()))
    assert result["results"][0]["probabilities"] == {"negative": 0.25, "positive": 0.75}


def test_model_info_from_pb():
    msg = pb.ModelInfo(
        name="sentiment",
        version="2",
        kind=pb.MODEL_KIND_CLASSIFIER,
        labels=["negative", "positive"],
        limits=pb.ModelLimits(max_sequence_length=128, max_texts_per_request=64),
        batching=pb.BatchingSettings(
            max_batch_size=32, max_queue_delay_ms=2.5, max_queue_size=256, policy="adaptive"
        ),
        execution_provider="CPUExecutionProvider",
        variant="fp32",
        embedding_size=384,
        ready=True,
    )
    info = ModelInfo.from_pb(msg)
    assert info.kind is ModelKind.CLASSIFIER and info.kind == "classifier"
    assert info.labels == ["negative", "positive"]
    assert info.limits.max_sequence_length == 128 and info.limits.max_texts_per_request == 64
    assert info.batching.policy == "adaptive" and info.batching.max_queue_delay_ms == 2.5
    assert (info.execution_provider, info.variant, info.embedding_size, info.ready) == (
        "CPUExecutionProvider",
        "fp32",
        384,
        True,
    )
    assert json.loads(json.dumps(info.to_dict()))["kind"] == "classifier"
    assert ModelKind.from_pb(pb.MODEL_KIND_GENERATOR) is ModelKind.GENERATOR
    assert ModelKind.from_pb(99) is ModelKind.UNSPECIFIED  # a kind from a newer server


# ---------------------------------------------------------------------------------------------------------
# Requests


def test_classify_request_takes_one_string_as_one_text():
    assert list(req.classify_request("a film", None, False, False).texts) == ["a film"]
    request = req.classify_request(iter(["a", "b"]), "sentiment", True, True)
    assert (list(request.texts), request.model, request.return_embedding, request.no_truncation) == (
        ["a", "b"],
        "sentiment",
        True,
        True,
    )


def _generate(**kw) -> pb.GenerateRequest:
    args = {
        "prompt": "Once",
        "model": None,
        "max_new_tokens": None,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": None,
        "repetition_penalty": None,
        "seed": None,
        "stop": (),
        "logprobs": False,
    }
    args.update(kw)
    return req.generate_request(**args)


def test_generate_request_leaves_unset_options_to_the_server():
    params = _generate().parameters
    for name in ("max_new_tokens", "top_p", "repetition_penalty", "seed"):
        assert not params.HasField(name), name


def test_generate_request_sets_what_is_given():
    request = _generate(
        model="docgpt",
        max_new_tokens=0,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        repetition_penalty=1.2,
        seed=2**64 - 1,
        stop="\n\n",
        logprobs=True,
    )
    p = request.parameters
    assert request.model == "docgpt" and request.prompt == "Once"
    # 0 is sent (the server refuses it, naming the field), not taken for "unset".
    assert p.HasField("max_new_tokens") and p.max_new_tokens == 0
    assert math.isclose(p.temperature, 0.7, rel_tol=1e-6) and p.top_k == 5
    assert math.isclose(p.top_p, 0.9, rel_tol=1e-6) and math.isclose(p.repetition_penalty, 1.2, rel_tol=1e-6)
    assert p.seed == 2**64 - 1 and list(p.stop) == ["\n\n"] and p.logprobs


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"seed": -1}, "seed"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": [1]}, "stop"),
        ({"max_new_tokens": 2**40}, "max_new_tokens"),
        ({"prompt": 5}, "prompt"),
    ],
)
def test_a_value_the_proto_cannot_carry_names_the_field(kw, field):
    with pytest.raises((TypeError, ValueError), match=f"^{field}: "):
        _generate(**kw)


# ---------------------------------------------------------------------------------------------------------
# Health: the client's own description of grpc.health.v1 must match the wire format of the official stubs.


def test_health_messages_match_the_official_stubs():
    from grpc_health.v1 import health_pb2  # the server's dependency; importing both must not clash

    official = health_pb2.HealthCheckRequest(service="sentiment").SerializeToString()
    assert req.HealthCheckRequest(service="sentiment").SerializeToString() == official
    for name in ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"):
        wire = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.ServingStatus.Value(name))
        assert req.health_status_name(req.HealthCheckResponse.FromString(wire.SerializeToString())) == name
