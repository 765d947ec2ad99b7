"""The Open Inference Protocol (KServe v2, Triton's gRPC), end to end: the real server on port 0, raw stubs of
protos/inference/grpc_service.proto over loopback, on the quick demo models (classifier `sentiment`, embedder
`minilm-embed`, generator `docgpt`): every RPC, both encodings of BYTES, shapes [N] and [N, 1], errors naming
the tensor, decoupled streaming with the final flag, statistics counting real calls, and the same answers as
nlpserve.v1 on the same port."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from e2e_util import sample, scrape, wait_streams_ended

from client.proto import inference_pb2 as nl
from server.servicers.oip import grpc_service_pb2 as pb
from server.servicers.oip import grpc_service_pb2_grpc

TEXTS = ["a moving, beautiful film", "boring and far too long", "fine", "Café 東京 🙂"]
Input = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor
TIMEOUT = 30


@pytest.fixture(scope="module")
def oip(channel) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def raw_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def unraw_bytes(data: bytes) -> list[bytes]:
    items, at = [], 0
    while at < len(data):
        (n,) = struct.unpack_from("<I", data, at)
        items.append(data[at + 4 : at + 4 + n])
        at += 4 + n
    return items


def text_request(model: str, texts: list[str], shape: list[int], raw: bool, **kw) -> pb.ModelInferRequest:
    data = [t.encode() for t in texts]
    if raw:
        return pb.ModelInferRequest(
            model_name=model, inputs=[Input(name="text", datatype="BYTES", shape=shape)],
            raw_input_contents=[raw_bytes(data)], **kw,
        )  # fmt: skip
    contents = pb.InferTensorContents(bytes_contents=data)
    return pb.ModelInferRequest(
        model_name=model, inputs=[Input(name="text", datatype="BYTES", shape=shape, contents=contents)], **kw
    )


TOKEN_INPUTS = {"text": ("BYTES", [-1, 1]), "input_ids": ("INT64", [-1, -1]), "attention_mask": ("INT64", [-1, -1]), "token_type_ids": ("INT64", [-1, -1])}


def ids_request(model: str, ids: list[list[int]], mask: list[list[int]] | None, text: bool = False,
                **kw) -> pb.ModelInferRequest:
    """input_ids [N, T] (and attention_mask) as raw INT64 tensors; `text` adds a text tensor too."""
    inputs = [Input(name="input_ids", datatype="INT64", shape=[len(ids), len(ids[0])])]
    raw = [np.array(ids, "<i8").tobytes()]
    if mask is not None:
        inputs.append(Input(name="attention_mask", datatype="INT64", shape=[len(mask), len(mask[0])]))
        raw.append(np.array(mask, "<i8").tobytes())
    if text:
        inputs.append(Input(name="text", datatype="BYTES", shape=[1]))
        raw.append(raw_bytes([b"hello"]))
    return pb.ModelInferRequest(model_name=model, inputs=inputs, raw_input_contents=raw, **kw)


def outputs(response: pb.ModelInferResponse) -> dict[str, tuple[str, list[int], object]]:
    """name -> (datatype, shape, data: numpy array or list of bytes), read from raw_output_contents."""
    assert len(response.raw_output_contents) == len(response.outputs)  # Triton's form: every output raw
    result = {}
    for tensor, data in zip(response.outputs, response.raw_output_contents):
        shape = list(tensor.shape)
        if tensor.datatype == "BYTES":
            value = unraw_bytes(data)
        else:
            value = np.frombuffer(data, dtype={"FP32": "<f4"}[tensor.datatype]).reshape(shape)
        result[tensor.name] = (tensor.datatype, shape, value)
    return result


def generate_request(prompt: str, max_tokens: int, request_id: str = "", **tensors) -> pb.ModelInferRequest:
    inputs = [
        Input(name="text_input", datatype="BYTES", shape=[1, 1],
              contents=pb.InferTensorContents(bytes_contents=[prompt.encode()])),
        Input(name="max_tokens", datatype="INT32", shape=[1, 1],
              contents=pb.InferTensorContents(int_contents=[max_tokens])),
    ]  # fmt: skip
    for name, (datatype, field, values) in tensors.items():
        inputs.append(
            Input(name=name, datatype=datatype, shape=[1], contents=pb.InferTensorContents(**{field: values}))
        )
    return pb.ModelInferRequest(model_name="docgpt", id=request_id, inputs=inputs)


def vllm_request(sampling_parameters: str) -> pb.ModelInferRequest:
    """A generation request whose settings are vLLM's `sampling_parameters` JSON."""
    request = generate_request("def ", 8)
    del request.inputs[1]
    request.inputs.append(Input(name="sampling_parameters", datatype="BYTES", shape=[1],
                                contents=pb.InferTensorContents(bytes_contents=[sampling_parameters.encode()])))
    return request


def error_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code(), exc.value.details()


def stats_of(oip, model: str) -> pb.ModelStatistics:
    (stats,) = oip.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=TIMEOUT).model_stats
    return stats


# ------------------------------------------------------------------------------------------------------------
# Health, metadata, configuration, the repository


def test_health(oip):
    assert oip.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT).live
    assert oip.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
    for model in ("sentiment", "minilm-embed", "docgpt"):
        assert oip.ModelReady(pb.ModelReadyRequest(name=model), timeout=TIMEOUT).ready
        assert oip.ModelReady(pb.ModelReadyRequest(name=model, version="1"), timeout=TIMEOUT).ready
    code, details = error_of(lambda: oip.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, details = error_of(lambda: oip.ModelReady(pb.ModelReadyRequest(name="sentiment", version="7")))
    assert code == grpc.StatusCode.NOT_FOUND and "version '7'" in details


def test_server_metadata_lists_the_extensions(oip):
    meta = oip.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT)
    assert meta.name == "nlpserve" and meta.version
    assert {"statistics", "model_configuration", "parameters"} <= set(meta.extensions)


def test_model_metadata_per_kind(oip):
    def tensors(items):
        return {t.name: (t.datatype, list(t.shape)) for t in items}

    meta = oip.ModelMetadata(pb.ModelMetadataRequest(name="sentiment"), timeout=TIMEOUT)
    assert (
        meta.name == "sentiment" and list(meta.versions) == ["1"] and meta.platform == "nlpserve_classifier"
    )
    # text, or token ids instead (the graph's tensors)
    assert tensors(meta.inputs) == TOKEN_INPUTS
    outs = tensors(meta.outputs)
    assert outs["label"] == ("BYTES", [-1]) and outs["probabilities"] == ("FP32", [-1, 2])
    assert outs["embedding"][0] == "FP32" and outs["embedding"][1][0] == -1

    meta = oip.ModelMetadata(pb.ModelMetadataRequest(name="minilm-embed"), timeout=TIMEOUT)
    assert tensors(meta.inputs) == TOKEN_INPUTS
    assert list(tensors(meta.outputs)) == ["embedding"]

    meta = oip.ModelMetadata(pb.ModelMetadataRequest(name="docgpt"), timeout=TIMEOUT)
    inputs = tensors(meta.inputs)
    assert inputs["text_input"] == ("BYTES", [-1, 1]) and inputs["max_tokens"] == ("INT32", [-1, 1])
    assert {"stream", "temperature", "top_k", "top_p", "seed", "stop"} <= set(inputs)
    assert tensors(meta.outputs) == {"text_output": ("BYTES", [-1, 1])}

    code, _ = error_of(lambda: oip.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND


def test_model_config(oip, stub):
    config = oip.ModelConfig(pb.ModelConfigRequest(name="sentiment"), timeout=TIMEOUT).config
    info = stub.GetModel(nl.GetModelRequest(name="sentiment"), timeout=TIMEOUT)
    assert config.name == "sentiment" and config.backend == "nlpserve"
    assert config.max_batch_size == info.limits.max_texts_per_request > 0
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("text", pb.TYPE_STRING, [1], True), ("input_ids", pb.TYPE_INT64, [-1], True),
        ("attention_mask", pb.TYPE_INT64, [-1], True), ("token_type_ids", pb.TYPE_INT64, [-1], True),
    ]  # text or token ids
    assert {o.name for o in config.output} == {"label", "probabilities", "embedding"}
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(config.dynamic_batching.preferred_batch_size) == [info.batching.max_batch_size]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == info.batching.max_queue_size
    assert not config.HasField("model_transaction_policy")
    assert config.parameters["labels"].string_value == ",".join(info.labels)

    config = oip.ModelConfig(pb.ModelConfigRequest(name="docgpt"), timeout=TIMEOUT).config
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 1
    required = [i.name for i in config.input if not i.optional]
    assert required == ["text_input"]
    assert [(o.name, o.data_type) for o in config.output] == [("text_output", pb.TYPE_STRING)]
    limits = stub.GetModel(nl.GetModelRequest(name="docgpt"), timeout=TIMEOUT).limits
    assert limits.kv_cache_tokens > 0
    assert config.parameters["kv_cache_tokens"].string_value == str(limits.kv_cache_tokens)
    assert config.parameters["max_new_tokens"].string_value == str(limits.max_new_tokens)


def test_repository_index(oip):
    index = oip.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=TIMEOUT)
    assert {(m.name, m.version, m.state) for m in index.models} == {
        ("sentiment", "1", "READY"), ("minilm-embed", "1", "READY"), ("docgpt", "1", "READY"),
    }  # fmt: skip
    ready = oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=TIMEOUT)
    assert len(ready.models) == 3


def test_reflection_lists_the_service(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    names = {s.name for s in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "nlpserve.v1.InferenceService"} <= names


# ------------------------------------------------------------------------------------------------------------
# Encoders


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "contents"])
@pytest.mark.parametrize("column", [False, True], ids=["N", "Nx1"])
def test_classify_both_encodings_and_shapes_agree_with_nlpserve(oip, stub, raw, column):
    shape = [len(TEXTS), 1] if column else [len(TEXTS)]
    response = oip.ModelInfer(text_request("sentiment", TEXTS, shape, raw, id="req-7"), timeout=TIMEOUT)
    assert (response.model_name, response.model_version, response.id) == ("sentiment", "1", "req-7")
    out = outputs(response)
    assert list(out) == ["label", "probabilities"]  # the default outputs: no embedding unless asked
    assert out["label"][:2] == ("BYTES", [len(TEXTS)])
    assert out["probabilities"][:2] == ("FP32", [len(TEXTS), 2])
    reference = stub.Classify(nl.ClassifyRequest(model="sentiment", texts=TEXTS), timeout=TIMEOUT)
    assert [b.decode() for b in out["label"][2]] == [r.label for r in reference.results]
    np.testing.assert_allclose(
        out["probabilities"][2], [list(r.probabilities) for r in reference.results], rtol=0, atol=1e-6
    )


def test_classify_embedding_only_when_asked(oip, stub):
    request = text_request("sentiment", TEXTS[:2], [2], raw=True, outputs=[Output(name="embedding")])
    out = outputs(oip.ModelInfer(request, timeout=TIMEOUT))
    assert list(out) == ["embedding"]
    reference = stub.Classify(
        nl.ClassifyRequest(model="sentiment", texts=TEXTS[:2], return_embedding=True), timeout=TIMEOUT
    )
    np.testing.assert_allclose(out["embedding"][2], [list(r.embedding) for r in reference.results], atol=1e-6)
    both = text_request(
        "sentiment", TEXTS[:1], [1], raw=False, outputs=[Output(name="probabilities"), Output(name="label")]
    )
    assert list(outputs(oip.ModelInfer(both, timeout=TIMEOUT))) == ["probabilities", "label"]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "contents"])
def test_embed_agrees_with_nlpserve(oip, stub, raw):
    out = outputs(oip.ModelInfer(text_request("minilm-embed", TEXTS, [len(TEXTS), 1], raw), timeout=TIMEOUT))
    reference = stub.Embed(nl.EmbedRequest(model="minilm-embed", texts=TEXTS), timeout=TIMEOUT)
    datatype, shape, vectors = out["embedding"]
    assert datatype == "FP32" and shape == [len(TEXTS), reference.dimensions]
    np.testing.assert_allclose(vectors, [list(e.values) for e in reference.embeddings], atol=1e-6)
    request = text_request("minilm-embed", TEXTS[:1], [1], raw)
    request.parameters["dimensions"].int64_param = 8
    assert outputs(oip.ModelInfer(request, timeout=TIMEOUT))["embedding"][1] == [1, 8]


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_ids_instead_of_text_give_the_same_results(oip, stub, models, side):
    """input_ids + attention_mask, padded on either side, as the model's own tokenizer gives them: the same
    probabilities as the texts (classifier) and the same vectors (embedder); token_type_ids accepted."""
    from tokenizers import Tokenizer

    for model, output in (("sentiment", "probabilities"), ("minilm-embed", "embedding")):
        tokenizer = Tokenizer.from_file(str(next((models / model).glob("*/tokenizer.json"))))
        tokenizer.no_padding()
        rows = [e.ids for e in tokenizer.encode_batch(TEXTS)]
        width = max(map(len, rows))
        pad = [[0] * (width - len(r)) for r in rows]
        ids = [r + p if side == "right" else p + r for r, p in zip(rows, pad)]
        mask = [[1] * len(r) + [0] * len(p) if side == "right" else [0] * len(p) + [1] * len(r)
                for r, p in zip(rows, pad)]
        request = ids_request(model, ids, mask)
        request.inputs.append(Input(name="token_type_ids", datatype="INT64", shape=[len(ids), width]))
        request.raw_input_contents.append(np.zeros((len(ids), width), "<i8").tobytes())
        by_ids = outputs(oip.ModelInfer(request, timeout=TIMEOUT))[output]
        by_text = outputs(oip.ModelInfer(text_request(model, TEXTS, [len(TEXTS)], True), timeout=TIMEOUT))[output]
        assert by_ids[:2] == by_text[:2]
        np.testing.assert_allclose(by_ids[2], by_text[2], atol=1e-5)


def test_both_fronts_share_the_batcher(oip, stub, srv):
    """Calls through both fronts at once are all answered, and every text goes through the one batcher."""
    before = scrape(srv)

    def call(i: int) -> None:
        if i % 2:
            out = outputs(
                oip.ModelInfer(text_request("sentiment", TEXTS[:2], [2], raw=True), timeout=TIMEOUT)
            )
            assert len(out["label"][2]) == 2
        else:
            assert (
                len(
                    stub.Classify(
                        nl.ClassifyRequest(model="sentiment", texts=TEXTS[:2]), timeout=TIMEOUT
                    ).results
                )
                == 2
            )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(16)))
    after = scrape(srv)
    labels = {"model": "sentiment", "method": "Classify"}
    assert (
        sample(after, "nlpserve_batch_size_sum", **labels)
        - sample(before, "nlpserve_batch_size_sum", **labels)
        == 32
    )
    ok = {"model": "sentiment", "method": "ModelInfer", "code": "OK"}
    assert (
        sample(after, "nlpserve_requests_total", **ok) - sample(before, "nlpserve_requests_total", **ok) == 8
    )


# ------------------------------------------------------------------------------------------------------------
# Generation


def test_generate_whole_text_agrees_with_nlpserve(oip, stub):
    response = oip.ModelInfer(generate_request("def ", 12, "g1"), timeout=TIMEOUT)
    out = outputs(response)
    assert response.id == "g1" and out["text_output"][:2] == ("BYTES", [1, 1])
    reference = stub.Generate(
        nl.GenerateRequest(
            model="docgpt", prompt="def ", parameters=nl.GenerationParameters(max_new_tokens=12)
        ),
        timeout=TIMEOUT,
    )
    assert out["text_output"][2] == [reference.text.encode()]
    # exclude_input_in_output false: the prompt, then the text (as Triton's LLM backends answer).
    with_prompt = generate_request("def ", 12, exclude_input_in_output=("BOOL", "bool_contents", [False]))
    assert outputs(oip.ModelInfer(with_prompt, timeout=TIMEOUT))["text_output"][2] == [
        ("def " + reference.text).encode()
    ]


def test_sampling_settings_as_tensors_parameters_or_vllm_json(oip, stub):
    params = nl.GenerationParameters(max_new_tokens=10, temperature=0.8, top_k=20, seed=5)
    reference = stub.Generate(
        nl.GenerateRequest(model="docgpt", prompt="Return the", parameters=params), timeout=TIMEOUT
    ).text
    as_tensors = generate_request(
        "Return the", 10, temperature=("FP32", "fp32_contents", [0.8]), top_k=("INT32", "int_contents", [20]),
        random_seed=("UINT64", "uint64_contents", [5]),
    )  # fmt: skip
    as_params = generate_request("Return the", 10)
    as_params.parameters["temperature"].double_param = 0.8
    as_params.parameters["top_k"].int64_param = 20
    as_params.parameters["seed"].int64_param = 5
    vllm = generate_request("Return the", 10)
    del vllm.inputs[1]  # max_tokens in the JSON instead, as a string (genai-perf writes them so)
    vllm.inputs.append(
        Input(
            name="sampling_parameters",
            datatype="BYTES",
            shape=[1],
            contents=pb.InferTensorContents(
                bytes_contents=[
                    json.dumps({"max_tokens": "10", "temperature": 0.8, "top_k": 20, "seed": 5}).encode()
                ]
            ),
        )
    )
    for request in (as_tensors, as_params, vllm):
        assert outputs(oip.ModelInfer(request, timeout=TIMEOUT))["text_output"][2] == [reference.encode()]


def read_stream(responses, count: int) -> dict[str, list[pb.ModelStreamInferResponse]]:
    """The stream's responses by request id, until `count` requests got their final response."""
    by_id: dict[str, list] = {}
    finals = 0
    for r in responses:
        by_id.setdefault(r.infer_response.id, []).append(r)
        finals += r.infer_response.parameters["triton_final_response"].bool_param
        if finals == count:
            break
    return by_id


def texts_of(responses: list[pb.ModelStreamInferResponse]) -> str:
    return "".join(
        b.decode() for r in responses for b in (outputs(r.infer_response).get("text_output", (0, 0, []))[2])
    )


def test_stream_pieces_then_the_final_flag(oip, stub):
    reference = stub.Generate(
        nl.GenerateRequest(
            model="docgpt", prompt="def ", parameters=nl.GenerationParameters(max_new_tokens=24)
        ),
        timeout=TIMEOUT,
    ).text
    # Without triton_enable_empty_final_response the last piece carries the flag; with it, an empty response.
    plain = generate_request("def ", 24, "plain", stream=("BOOL", "bool_contents", [True]))
    empty = generate_request("def ", 24, "empty")
    empty.parameters["triton_enable_empty_final_response"].bool_param = True
    by_id = read_stream(oip.ModelStreamInfer(iter([plain, empty]), timeout=TIMEOUT), 2)
    for request_id in ("plain", "empty"):
        responses = by_id[request_id]
        assert not any(r.error_message for r in responses)
        flags = [r.infer_response.parameters["triton_final_response"].bool_param for r in responses]
        assert flags == [False] * (len(flags) - 1) + [True]
        assert texts_of(responses) == reference
        for r in responses:
            assert r.infer_response.model_name == "docgpt" and r.infer_response.model_version == "1"
    assert outputs(by_id["plain"][-1].infer_response)["text_output"][1] == [1, 1]
    assert not by_id["empty"][-1].infer_response.outputs  # Triton's empty final response
    # stream false: one response, the whole text, final.
    (whole,) = read_stream(
        oip.ModelStreamInfer(iter([generate_request("def ", 24, "w", stream=("BOOL", "bool_contents", [False]))]),
                             timeout=TIMEOUT), 1,
    )["w"]  # fmt: skip
    assert (
        texts_of([whole]) == reference and whole.infer_response.parameters["triton_final_response"].bool_param
    )


def test_stream_errors_go_in_the_stream_which_goes_on(oip):
    bad = generate_request("def ", 0, "bad")
    unknown = pb.ModelInferRequest(model_name="nope", id="unknown")
    classify = text_request("sentiment", TEXTS[:2], [2], raw=True, id="cls")
    good = generate_request("def ", 8, "good")
    by_id = read_stream(oip.ModelStreamInfer(iter([bad, unknown, classify, good]), timeout=TIMEOUT), 4)
    (bad_response,) = by_id["bad"]
    assert bad_response.error_message.startswith("max_tokens: ")
    assert bad_response.infer_response.parameters["triton_final_response"].bool_param
    (unknown_response,) = by_id["unknown"]
    assert "nope" in unknown_response.error_message
    (cls,) = by_id["cls"]  # a classifier over the stream: one response, final
    assert not cls.error_message and len(outputs(cls.infer_response)["label"][2]) == 2
    assert by_id["good"][-1].infer_response.parameters["triton_final_response"].bool_param
    assert not any(r.error_message for r in by_id["good"])


def test_leaving_a_stream_cancels_its_generation(oip, srv):
    """A client that goes away mid-stream frees its sequence (nlpserve_active_sequences back to 0), and the
    request is counted CANCELLED. The quick model may finish before the cancel reaches the server (then OK):
    rounds repeat until one was cancelled; each waits, without a time bound of its own beyond a generous
    deadline, until the server counted the request and holds no sequence."""
    for _ in range(20):
        before = scrape(srv)
        call = oip.ModelStreamInfer(iter([generate_request("def ", 120, "long")]), timeout=TIMEOUT)
        next(call)
        call.cancel()
        counted, _ = wait_streams_ended(srv, before, "ModelStreamInfer", 1)
        if counted["CANCELLED"]:
            return
    pytest.fail("no stream was cancelled mid-generation in 20 rounds")


# ------------------------------------------------------------------------------------------------------------
# Errors


def infer_error(oip, request) -> tuple[grpc.StatusCode, str]:
    return error_of(lambda: oip.ModelInfer(request, timeout=TIMEOUT))


def test_errors_name_the_tensor(oip):
    int_text = pb.ModelInferRequest(
        model_name="sentiment",
        inputs=[
            Input(
                name="text", datatype="INT64", shape=[1], contents=pb.InferTensorContents(int64_contents=[1])
            )
        ],
    )
    cases = [
        (int_text, "text: datatype INT64, expected BYTES"),
        (
            text_request("sentiment", ["a", "b"], [1, 2], raw=True),
            "text: shape [1, 2], expected [N] or [N, 1]",
        ),
        (
            text_request("sentiment", ["a", "b"], [3], raw=False),
            "text: 2 elements in contents.bytes_contents",
        ),
        (text_request("sentiment", ["a", "b"], [3], raw=True), "text: 2 BYTES elements in raw data"),
        (pb.ModelInferRequest(model_name="sentiment"), "text: send either text (BYTES) or input_ids"),
        (text_request("sentiment", ["a", ""], [2], raw=True), "text[1]: empty text"),
        (
            text_request("sentiment", ["a"], [1], raw=True, outputs=[Output(name="logits")]),
            "outputs: 'logits'",
        ),
        (generate_request("def ", 0), "max_tokens: "),
        (
            generate_request("def ", 8, temperature=("BYTES", "bytes_contents", [b"hot"])),
            "temperature: datatype BYTES",
        ),
        (
            generate_request("def ", 8, min_length=("INT32", "int_contents", [4])),
            "min_length: not an input of model docgpt",
        ),
        (generate_request("", 8), "text_input: empty prompt"),
        # vLLM's JSON: what Python's parser or int() cannot take is INVALID_ARGUMENT too, never INTERNAL
        (vllm_request('{"max_tokens": 1e400}'), "sampling_parameters.max_tokens: "),
        (vllm_request('{"top_k": -Infinity}'), "sampling_parameters: not valid JSON"),
        (vllm_request("[" * 100_000), "sampling_parameters: not valid JSON"),
        (vllm_request(json.dumps({"max_tokens": "9" * 4000})), "max_tokens: 99999999999999999999...(4000 digits)"),
    ]
    for request, message in cases:
        code, details = infer_error(oip, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (message, details)
        assert details.startswith(message), (message, details)

    truncated = text_request("sentiment", ["abc"], [1], raw=True)
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-1]
    assert infer_error(oip, truncated) == (
        grpc.StatusCode.INVALID_ARGUMENT, "text: raw BYTES element 0 says 3 bytes, 2 are left",
    )  # fmt: skip
    two_raw = text_request("sentiment", ["a"], [1], raw=True)
    two_raw.raw_input_contents.append(b"")
    code, details = infer_error(oip, two_raw)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(
        "raw_input_contents: 2 entries for 1 inputs"
    )
    for request, message in [
        (ids_request("sentiment", [[1, 7, 2]], [[1, 1, 0, 1]]), "attention_mask: shape [1, 4], expected that of"),
        (ids_request("sentiment", [[1, 7, 2]], [[1, 2, 1]]), "attention_mask: values must be 0 or 1"),
        (ids_request("sentiment", [[1, 7, 2]], [[0, 0, 0]]), "input_ids[0]: no tokens"),
        (ids_request("sentiment", [[1, 10**9, 2]], None), "input_ids[0]: token ids must be in 0.."),
        (ids_request("sentiment", [[1] * 100_000], None), "input_ids[0]: 100000 tokens, more than the model's"),
        (ids_request("minilm-embed", [[1, 2]], None, text=True), "text: send either text (BYTES) or input_ids"),
    ]:
        code, details = infer_error(oip, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(message), (message, details)
    flat = pb.ModelInferRequest(model_name="sentiment", inputs=[Input(name="input_ids", datatype="INT64", shape=[3])],
                                raw_input_contents=[np.array([1, 7, 2], "<i8").tobytes()])  # fmt: skip
    code, details = infer_error(oip, flat)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("input_ids: shape [3], expected [N, T]")
    bad_utf8 = text_request("sentiment", ["a"], [1], raw=True)
    bad_utf8.raw_input_contents[0] = raw_bytes([b"\xff\xfe"])
    code, details = infer_error(oip, bad_utf8)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("text[0]: not valid UTF-8")


def test_unknown_model_and_version(oip):
    code, details = infer_error(oip, text_request("nope", ["a"], [1], raw=True))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, details = infer_error(oip, text_request("sentiment", ["a"], [1], raw=True, model_version="9"))
    assert code == grpc.StatusCode.NOT_FOUND and "version '9'" in details


def test_errors_are_counted_like_every_rpc(oip, srv):
    before = scrape(srv)
    infer_error(oip, text_request("sentiment", ["a"], [2], raw=True))
    after = scrape(srv)
    labels = {"model": "sentiment", "method": "ModelInfer", "code": "INVALID_ARGUMENT"}
    assert (
        sample(after, "nlpserve_requests_total", **labels)
        - sample(before, "nlpserve_requests_total", **labels)
        == 1
    )


# ------------------------------------------------------------------------------------------------------------
# Statistics


def test_statistics_count_real_calls(oip):
    before = stats_of(oip, "sentiment")
    for _ in range(3):  # one after the other: each its own batch
        oip.ModelInfer(text_request("sentiment", TEXTS, [len(TEXTS)], raw=True), timeout=TIMEOUT)
    infer_error(oip, text_request("sentiment", ["a"], [2], raw=True))
    after = stats_of(oip, "sentiment")
    assert after.name == "sentiment" and after.version == "1"
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == 3
    assert s1.fail.count - s0.fail.count == 1
    assert after.inference_count - before.inference_count == 3 * len(TEXTS)
    assert after.execution_count - before.execution_count == 3
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(s1, part).count - getattr(s0, part).count == 3, part
    assert s1.compute_infer.ns > s0.compute_infer.ns and s1.success.ns > s0.success.ns
    # A request's time is at least its queue and compute time.
    assert s1.success.ns - s0.success.ns >= (s1.queue.ns - s0.queue.ns) + (
        s1.compute_infer.ns - s0.compute_infer.ns
    )
    assert after.last_inference >= before.last_inference and after.last_inference > 0

    gen_before = stats_of(oip, "docgpt")
    read_stream(oip.ModelStreamInfer(iter([generate_request("def ", 6, "s")]), timeout=TIMEOUT), 1)
    oip.ModelInfer(generate_request("def ", 6), timeout=TIMEOUT)
    gen_after = stats_of(oip, "docgpt")
    assert gen_after.inference_stats.success.count - gen_before.inference_stats.success.count == 2
    assert gen_after.inference_count - gen_before.inference_count == 2
    assert gen_after.inference_stats.compute_infer.ns > gen_before.inference_stats.compute_infer.ns

    every = oip.ModelStatistics(pb.ModelStatisticsRequest(), timeout=TIMEOUT)
    assert {s.name for s in every.model_stats} == {"sentiment", "minilm-embed", "docgpt"}
    code, _ = error_of(lambda: oip.ModelStatistics(pb.ModelStatisticsRequest(name="nope"), timeout=TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND
