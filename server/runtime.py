"""ONNX Runtime sessions: the provider choice and the honest check of what is really in use, threads,
graph optimization, and IO binding on CUDA.

ONNX Runtime falls back to the CPU silently when the CUDA provider cannot load (no exception, two lines on
stderr), so after creating a session we read ``session.get_providers()`` and trust only that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from .config import Device, GraphOptimization
from .errors import DeviceLost, OutOfMemory, StartupError

log = logging.getLogger(__name__)

T = TypeVar("T")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

_REQUESTED = {
    Device.CPU: [CPU],
    Device.CUDA: [CUDA, CPU],
    Device.TENSORRT: [TENSORRT, CUDA, CPU],
}
_OPTIMIZATION = {
    GraphOptimization.DISABLED: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    GraphOptimization.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    GraphOptimization.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    GraphOptimization.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


# ONNX Runtime raises one exception type for every failure; its message tells an allocation that failed (the
# batch fails, the model serves on) from a device left unusable (every later call would fail too).
_OUT_OF_MEMORY = (
    "Failed to allocate memory",
    "out of memory",
    "bad_alloc",
    "bad allocation",
    "cudaErrorMemoryAllocation",
    "CUBLAS_STATUS_ALLOC_FAILED",
)
_DEVICE_LOST = (
    "illegal memory access",
    "cudaErrorIllegalAddress",
    "unspecified launch failure",
    "cudaErrorLaunchFailure",
    "device-side assert",
    "uncorrectable ECC",
    "misaligned address",
    "fallen off the bus",
    "cudaErrorDevicesUnavailable",
)


def failure_of(exc: Exception) -> Exception:
    """The core's exception for an error ONNX Runtime raised while running (the original when it is neither an
    allocation failure nor a lost device)."""
    message = str(exc)
    if any(text in message for text in _DEVICE_LOST):
        return DeviceLost("the model's device failed; this model no longer serves (the log has the details)")
    if any(text in message for text in _OUT_OF_MEMORY):
        return OutOfMemory("out of memory for this batch; retry with fewer or shorter inputs, or later")
    return exc


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA (and TensorRT) provider's settings: which GPU, how much memory its arena may take, how it grows."""

    device_id: int = 0
    memory_limit_mb: int = 0  # 0: no limit
    arena_extend_strategy: str = "kSameAsRequested"

    def provider_options(self, provider: str) -> dict[str, str]:
        """ONNX Runtime's options for `provider` (its documented names, as strings)."""
        if provider == CUDA:
            options = {"device_id": str(self.device_id), "arena_extend_strategy": self.arena_extend_strategy}
            if self.memory_limit_mb:
                options["gpu_mem_limit"] = str(self.memory_limit_mb * 2**20)
            return options
        if provider == TENSORRT:
            return {"device_id": str(self.device_id)}
        return {}


def requested_providers(device: Device) -> list[str]:
    """Providers to ask ONNX Runtime for, in order. ``auto`` asks for CUDA when this build offers it."""
    if device is Device.AUTO:
        return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]
    return list(_REQUESTED[device])


# The intra-op threads of ONNX Runtime's global thread pool, once `share_thread_pool` created it.
_shared_threads: int | None = None


def share_thread_pool(threads: int) -> None:
    """From now on every session of this process runs on one pool of `threads` intra-op threads (0: one per
    core) that spin while they wait (ONNX Runtime's global thread pool; its threads always spin). For a server
    whose sessions take turns on the same cores (a generator and its mixed-step graph): two spinning pools would
    fight over them. Once per process: ONNX Runtime can neither replace that pool nor, once it is there, create
    a session with threads of its own."""
    global _shared_threads
    if _shared_threads is not None:
        raise RuntimeError("the shared thread pool is already there")
    ort.set_global_thread_pool_sizes(threads, 1)
    _shared_threads = threads
    log.info("every session shares one pool of %s spinning intra-op threads", threads or "one per core's")


def thread_pool_shared() -> bool:
    return _shared_threads is not None


def apply_thread_pool(options: ort.SessionOptions) -> None:
    """A session of this process on the shared pool, when there is one (it must be: ONNX Runtime refuses a
    session with threads of its own then)."""
    if _shared_threads is not None:
        options.use_per_session_threads = False


class Session:
    """One ONNX Runtime session and the provider really in use. ``run`` is thread-safe (ONNX Runtime's own
    guarantee) and releases the GIL while it computes, so it belongs in a worker thread, off the event loop."""

    def __init__(
        self,
        path: Path,
        device: Device,
        intra_op_threads: int = 0,
        optimization: GraphOptimization = GraphOptimization.ALL,
        io_binding: bool | None = None,
        cuda: CudaOptions | None = None,
        spinning: bool = False,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPTIMIZATION[optimization]
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # Inter-op parallelism does not help these sequential graphs; one thread keeps the core count honest.
        options.inter_op_num_threads = 1
        # Spinning (a worker waiting for its next piece of work busy-waits for a while before it sleeps): off by
        # default, as it takes CPU from the event loop (docs/server.md, "Execution providers").
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        apply_thread_pool(options)  # then `intra_op_threads` and spinning are the shared pool's
        requested = requested_providers(device)
        cuda = cuda or CudaOptions()
        self.path = path
        self.cuda = cuda
        self.intra_op_threads = intra_op_threads
        # UNVERIFIED without a GPU: the CUDA options reach ONNX Runtime (a CPU-only run ignores them).
        self.provider_options = [cuda.provider_options(p) for p in requested]
        self.session = ort.InferenceSession(
            str(path), options, providers=requested, provider_options=self.provider_options
        )
        active = self.session.get_providers()
        self.provider = active[0]
        if (
            device is Device.CUDA
            and CUDA not in active
            or device is Device.TENSORRT
            and TENSORRT not in active
        ):
            wanted = TENSORRT if device is Device.TENSORRT else CUDA
            raise StartupError(
                f"--device {device.value}: ONNX Runtime did not activate {wanted} for {path} (active: "
                f"{', '.join(active)}; this build offers {', '.join(ort.get_available_providers())}). "
                "Check the GPU driver, CUDA and cuDNN libraries, or use --device cpu or auto."
            )
        # On a GPU, inputs and outputs go through IO binding: ONNX Runtime copies inputs to the device once and
        # allocates outputs there, instead of the implicit host round trips of `run`; outputs the caller
        # feeds back (the KV cache) can stay on the device. `io_binding=True` forces the same path on the CPU,
        # which is how the tests exercise it without a GPU.
        self.device = "cuda" if self.provider in (CUDA, TENSORRT) else "cpu"
        self.device_id = cuda.device_id if self.device == "cuda" else 0  # where IO binding puts device tensors
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_types = {o.name: _NUMPY_TYPES.get(o.type, np.float32) for o in self.session.get_outputs()}
        # Called (from the worker thread) once the device is lost; the model hub turns the model NOT_SERVING.
        self.on_device_lost: Callable[[], None] | None = None
        self.lost = False
        log.info("loaded %s on %s (asked for %s)", path, self.provider, ", ".join(requested))

    def run(
        self,
        output_names: Sequence[str],
        feeds: Mapping[str, np.ndarray | ort.OrtValue],
        keep: Collection[str] = (),
    ) -> list[np.ndarray | ort.OrtValue]:
        """Runs the graph; returns the named outputs as host numpy arrays, except those in `keep`, which with IO
        binding stay where ONNX Runtime put them (an ``OrtValue`` on the device) to be fed back as they are."""
        if not self.io_binding:
            return self.guarded(self.session.run, list(output_names), dict(feeds))
        # On CUDA this path is UNVERIFIED (no GPU on the development machine); the tests run it on the CPU.
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in output_names:
            # What the caller reads on the host is copied there by ONNX Runtime; the rest stays on the device.
            binding.bind_output(name, self.device if name in keep else "cpu", self.device_id if name in keep else 0)
        self.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return [v if name in keep else v.numpy() for name, v in zip(output_names, outputs)]

    def run_with_iobinding(self, binding: ort.IOBinding, run_options: ort.RunOptions | None = None) -> None:
        """Runs the graph on `binding` (as ONNX Runtime's own method), with the failures of `guarded`."""
        self.guarded(self.session.run_with_iobinding, binding, run_options)

    def guarded(self, run: Callable[..., T], *args: object) -> T:
        """Calls `run(*args)` (a run of this session), turning ONNX Runtime's allocation failures into
        OutOfMemory and a lost device into DeviceLost (and `on_device_lost`)."""
        if self.lost:
            raise DeviceLost("the model's device failed earlier; this model no longer serves")
        try:
            return run(*args)
        except Exception as exc:
            failure = failure_of(exc)
            if failure is exc:
                raise
            if isinstance(failure, DeviceLost):
                log.error("the device of %s failed: %s", self.path, exc)
                self.lost = True
                if self.on_device_lost is not None:
                    self.on_device_lost()
            else:
                log.warning("%s: %s", self.path, str(exc).splitlines()[0][-300:])
            raise failure from exc
