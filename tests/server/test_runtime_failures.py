"""What ONNX Runtime's failures become: a real allocation failure on the CPU is OutOfMemory (the request fails,
the session serves on); a lost device (a CUDA error, which only a GPU can raise for real) is DeviceLost and
turns the model NOT_SERVING through the hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server.config import Device
from server.errors import DeviceLost, OutOfMemory, Unavailable
from server.models import ModelHub, ServedModel
from server.runtime import Session, failure_of
from server.types import ModelDescription


@pytest.fixture(scope="module")
def allocating_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """out = ones(shape): asks ONNX Runtime for as much memory as the caller says."""
    fill = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    node = helper.make_node("ConstantOfShape", ["shape"], ["out"], value=fill)
    graph = helper.make_graph(
        [node],
        "allocate",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("graphs") / "allocate.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("io_binding", [False, True])
def test_an_allocation_that_fails_is_out_of_memory_and_the_session_serves_on(allocating_graph, io_binding):
    session = Session(allocating_graph, Device.CPU, io_binding=io_binding)
    with pytest.raises(OutOfMemory):
        session.run(["out"], {"shape": np.array([2**42], dtype=np.int64)})  # 16 TiB
    assert not session.lost
    (out,) = session.run(["out"], {"shape": np.array([3], dtype=np.int64)})
    assert out.tolist() == [1.0, 1.0, 1.0]


def test_other_errors_of_onnx_runtime_pass_unchanged(allocating_graph):
    session = Session(allocating_graph, Device.CPU)
    with pytest.raises(Exception) as info:
        session.run(["out"], {"shape": np.array([[1, 2]], dtype=np.int64)})  # wrong rank
    assert not isinstance(info.value, (OutOfMemory, DeviceLost))
    assert failure_of(info.value) is info.value


@pytest.mark.parametrize(
    "message",
    [
        "CUDA failure 700: an illegal memory access was encountered ; GPU=0",
        "CUDA error cudaErrorLaunchFailure:unspecified launch failure",
    ],
)
def test_a_lost_device_stops_the_model_and_tells_the_hub(allocating_graph, message):
    session = Session(allocating_graph, Device.CPU)
    description = ModelDescription(
        name="m", version="1", kind="classifier", provider="CUDAExecutionProvider", variant="fp32",
        max_sequence_length=8, policy="adaptive", max_queue_size=1,
    )
    told: list[str] = []
    hub = ModelHub(on_unhealthy=told.append)
    served = ServedModel(description, session=session, ready=True)
    hub.add(served)

    def failing_run() -> None:  # what a CUDA kernel failure looks like from Python
        raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {message}")

    with pytest.raises(DeviceLost):
        session.guarded(failing_run)
    assert told == ["m"] and session.lost and not served.ready
    with pytest.raises(Unavailable):
        hub.pick("m", "classifier")
    with pytest.raises(DeviceLost):  # every later run fails at once, without touching the device
        session.run(["out"], {"shape": np.array([1], dtype=np.int64)})
    assert told == ["m"]


def test_cuda_settings_become_the_providers_options(allocating_graph):
    """--cuda-device-id, --cuda-memory-limit-mb and --cuda-arena-extend-strategy as ONNX Runtime's CUDA options
    (their documented names); the CPU provider gets none. On this machine's CPU run the session says so."""
    from server.config import load_settings
    from server.runtime import CPU, CUDA, TENSORRT, CudaOptions

    s = load_settings(["--models", "m", "--cuda-device-id", "1", "--cuda-memory-limit-mb", "512"], {})
    cuda = CudaOptions(s.cuda_device_id, s.cuda_memory_limit_mb, s.cuda_arena_extend_strategy.value)
    assert cuda.provider_options(CUDA) == {
        "device_id": "1", "arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": str(512 * 2**20)}
    assert cuda.provider_options(TENSORRT) == {"device_id": "1"} and cuda.provider_options(CPU) == {}
    assert "gpu_mem_limit" not in CudaOptions().provider_options(CUDA)  # 0: no limit
    session = Session(allocating_graph, Device.CPU, cuda=cuda)
    assert session.provider_options == [{}] and session.device == "cpu" and session.device_id == 0
