"""The Open Inference Protocol front's pure parts, without a server: tensor decoding and encoding
(kserve_tensors), the statistics counters (kserve_stats), and the batcher's WorkTimes that feed them."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from server.batching import DynamicBatcher, WorkTimes
from server.errors import InvalidInput
from server.servicers import kserve_tensors as t
from server.servicers.kserve_stats import Statistics
from server.servicers.oip import grpc_service_pb2 as pb

Input = pb.ModelInferRequest.InferInputTensor


def raw(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def test_bytes_round_trip_raw_and_contents():
    items = [b"", b"a", "東京 🙂".encode(), b"\x00" * 300]
    assert t._raw_bytes("x", t.encode_bytes(items), len(items)) == items
    raw_request = pb.ModelInferRequest(
        inputs=[Input(name="text", datatype="BYTES", shape=[4, 1])], raw_input_contents=[raw(items)]
    )
    listed = pb.ModelInferRequest(
        inputs=[
            Input(
                name="text",
                datatype="BYTES",
                shape=[4],
                contents=pb.InferTensorContents(bytes_contents=items),
            )
        ]
    )
    for request in (raw_request, listed):
        (tensor,) = t.read_inputs(request).values()
        assert tensor.data == items


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("INT32", "int_contents", [1, -2]),
        ("INT64", "int64_contents", [2**40, -1]),
        ("UINT64", "uint64_contents", [2**63, 1]),
        ("FP32", "fp32_contents", [0.5, -1.25]),
        ("FP64", "fp64_contents", [0.1, 2.0]),
        ("BOOL", "bool_contents", [True, False]),
    ],
)
def test_numbers_raw_and_contents_agree(datatype, field, values):
    dtype = t.DTYPES[datatype][0]
    listed = pb.ModelInferRequest(
        inputs=[
            Input(name="x", datatype=datatype, shape=[2], contents=pb.InferTensorContents(**{field: values}))
        ]
    )
    raw_request = pb.ModelInferRequest(
        inputs=[Input(name="x", datatype=datatype, shape=[1, 2])],
        raw_input_contents=[np.asarray(values, dtype=dtype).tobytes()],
    )
    a, b = (t.read_inputs(r)["x"].data for r in (listed, raw_request))
    np.testing.assert_array_equal(a, np.asarray(values, dtype=dtype))
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            pb.ModelInferRequest(inputs=[Input(name="x", datatype="FP8", shape=[1])]),
            "x: unknown datatype 'FP8'",
        ),
        (
            pb.ModelInferRequest(inputs=[Input(name="x", datatype="INT32", shape=[-1])]),
            "x: shape [-1] has a negative",
        ),
        (
            pb.ModelInferRequest(
                inputs=[Input(name="x", datatype="INT32", shape=[3])], raw_input_contents=[b"\0" * 8]
            ),
            "x: 8 bytes of raw data, expected 3 x 4",
        ),
        (
            pb.ModelInferRequest(inputs=[Input(name="x", datatype="FP16", shape=[1])]),
            "x: FP16 data must come in raw",
        ),
        (
            pb.ModelInferRequest(inputs=[Input(name="x", datatype="BYTES", shape=[0])] * 2),
            "x: given twice",
        ),
        (
            pb.ModelInferRequest(
                inputs=[Input(name="x", datatype="BYTES", shape=[1])], raw_input_contents=[b"\1\0"]
            ),
            "x: raw BYTES data ends inside the length of element 0",
        ),
    ],
)
def test_bad_tensors_name_themselves(request_, message):
    with pytest.raises(InvalidInput) as exc:
        t.read_inputs(request_)
    assert str(exc.value).startswith(message)


def test_an_unbounded_name_is_quoted_and_cut():
    name = "x" * 500
    with pytest.raises(InvalidInput) as exc:
        t.read_inputs(pb.ModelInferRequest(inputs=[Input(name=name, datatype="FP8", shape=[1])]))
    assert len(str(exc.value)) < 250 and "(500 characters)" in str(exc.value)


def test_outputs_go_raw():
    response = pb.ModelInferResponse()
    t.add_output(response, "p", "FP32", [2, 2], np.array([[1, 2], [3, 4]]))
    t.add_output(response, "label", "BYTES", [2], [b"pos", b"neg"])
    assert [o.name for o in response.outputs] == ["p", "label"]
    assert not response.outputs[0].HasField("contents")
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), [1, 2, 3, 4])
    assert t._raw_bytes("label", response.raw_output_contents[1], 2) == [b"pos", b"neg"]


def test_scalars():
    one = t.Tensor("max_tokens", "INT32", (1, 1), np.array([7], dtype="<i4"))
    assert t.integer(one) == 7 and t.number(one) == 7.0
    with pytest.raises(InvalidInput, match=r"^max_tokens: datatype INT32, expected BOOL"):
        t.boolean(one)
    two = t.Tensor("top_k", "INT32", (2,), np.array([1, 2], dtype="<i4"))
    with pytest.raises(InvalidInput, match=r"^top_k: shape \[2\], expected one element"):
        t.integer(two)


def test_statistics_count_each_batch_once():
    stats = Statistics()
    a, b, c = (stats.start("m", "1") for _ in range(3))
    a.batches, b.batches, c.batches = [1], [1], [2, 3]  # a and b were batched together; c ran in two parts
    for times in (a, b, c):
        times.inferences = 2
        times.compute_seconds = 0.001
        times.finish(True, 0.002)
    stats.start("m", "1").finish(False, 0.5)
    counters = stats.of("m", "1")
    assert counters.success.count == 3 and counters.fail.count == 1 and counters.fail.ns == 500_000_000
    assert counters.inference_count == 6 and counters.execution_count == 3
    assert counters.compute_infer.count == counters.compute_input.count == counters.queue.count == 3
    generation = stats.start("g", "1")  # no batches: one execution
    generation.finish(True, 0.1)
    assert stats.of("g", "1").execution_count == 1


async def test_the_batcher_fills_in_work_times():
    batcher = DynamicBatcher(
        lambda items: [x.upper() for x in items], max_batch_size=4, max_queue_delay_ms=0, max_queue_size=10
    )
    batcher.start()
    first, second = WorkTimes(), WorkTimes()
    assert await batcher.submit("a", times=first) == "A"
    assert await batcher.submit("b", times=second) == "B"
    assert await batcher.submit("c") == "C"  # no times: nothing to fill in
    await batcher.close()
    assert first.batches == [1] and second.batches == [2]
    assert first.compute_seconds > 0 and first.queue_seconds >= 0
