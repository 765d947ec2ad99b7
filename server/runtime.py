"""ONNX Runtime sessions: the provider choice and the honest check of what is really in use, threads,
graph optimization, and IO binding on CUDA.

ONNX Runtime falls back to the CPU silently when the CUDA provider cannot load (no exception, two lines on
stderr), so after creating a session we read ``session.get_providers()`` and trust only that.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .config import Device, GraphOptimization
from .errors import StartupError

log = logging.getLogger(__name__)

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


def requested_providers(device: Device) -> list[str]:
    """Providers to ask ONNX Runtime for, in order. ``auto`` asks for CUDA when this build offers it."""
    if device is Device.AUTO:
        return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]
    return list(_REQUESTED[device])


class Session:
    """One ONNX Runtime session and the provider really in use. ``run`` is thread-safe (ONNX Runtime's own
    guarantee) and releases the GIL while it computes, so it belongs in a worker thread, off the event loop."""

    def __init__(
        self,
        path: Path,
        device: Device,
        intra_op_threads: int = 0,
        optimization: GraphOptimization = GraphOptimization.ALL,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPTIMIZATION[optimization]
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # Inter-op parallelism does not help these sequential graphs; one thread keeps the core count honest.
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        requested = requested_providers(device)
        self.session = ort.InferenceSession(str(path), options, providers=requested)
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
        # allocates outputs there, instead of the implicit host round trips of `run`.
        self.io_binding = self.provider in (CUDA, TENSORRT)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        log.info("loaded %s on %s (asked for %s)", path, self.provider, ", ".join(requested))

    def run(self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Runs the graph; returns the named outputs as host numpy arrays."""
        if not self.io_binding:
            return self.session.run(list(output_names), dict(feeds))
        # UNVERIFIED here (no GPU on the development machine): written against ONNX Runtime's documented
        # IOBinding API; tests run the CPU branch above.
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in output_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
