"""Ranking a decode step's logits where the model computed them (`--device-sampling`).

On a GPU the logits of a step are a (B, vocabulary) array in device memory. Copying them to the host and
ranking them there (sampling.py) is host work that grows with the batch and the vocabulary (0.3 ms for greedy,
2 ms for top-k at 16 rows of 50k tokens on this project's 2-core machine), small against a CPU's decode step but
not against a GPU's. The sampling head is a second small graph, run on the model's own provider straight on the
model's output (IO binding, no copy):

    logits (B, T, V) -> last position -> the sampled vocabulary's columns -> float32
        -> TopK(k): values (B, k), ids (B, k), most likely first, ties by the lower id (as ONNX defines TopK)
        -> finite (B,): no NaN and no +inf in the row

so that only B x k values and ids cross to the host. `DeviceLogits` hands the sampler those candidates; the
rows that need the whole distribution (temperature alone, top-p without top-k, a repetition penalty) or
log-probabilities get the whole array copied to the host once, and are sampled as before. The candidates are
the same numbers in the same order as the host's ranking (`sampling._ranked`), so the tokens are the same
with the head or without it (tests/server/test_sampling_head.py checks that on the CPU provider).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..runtime import apply_thread_pool

# The ONNX IR version the head is written with (onnxruntime 1.31 reads up to 13).
IR_VERSION = 8
OPSET = 18


def head_graph(vocab: int, dtype: np.dtype) -> onnx.ModelProto:
    """The sampling head for logits of `dtype` whose first `vocab` columns may be sampled."""
    i64 = TensorProto.INT64
    constants = [
        helper.make_node("Constant", [], [name], value=helper.make_tensor(name, i64, [len(v)], v))
        for name, v in (("minus_one", [-1]), ("big", [2**62]), ("axis1", [1]), ("axis2", [2]), ("zero", [0]),
                        ("vocab", [vocab]))
    ]
    nodes = [
        *constants,
        helper.make_node("Slice", ["logits", "minus_one", "big", "axis1"], ["last"]),  # (B, 1, V)
        helper.make_node("Slice", ["last", "zero", "vocab", "axis2"], ["sampled"]),
        helper.make_node("Squeeze", ["sampled", "axis1"], ["rows"]),
        helper.make_node("Cast", ["rows"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("TopK", ["x", "k"], ["values", "ids"], axis=-1, largest=1, sorted=1),
        helper.make_node("IsNaN", ["x"], ["nan"]),
        helper.make_node("IsInf", ["x"], ["inf"], detect_negative=0),
        helper.make_node("Or", ["nan", "inf"], ["bad"]),
        helper.make_node("Cast", ["bad"], ["bad32"], to=TensorProto.INT32),
        helper.make_node("ReduceMax", ["bad32", "axis1"], ["any_bad"], keepdims=0),
        helper.make_node("Equal", ["any_bad", "zero32"], ["finite"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sampling_head",
        [
            helper.make_tensor_value_info(
                "logits", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["batch", "positions", "vocab"]
            ),
            helper.make_tensor_value_info("k", i64, [1]),
        ],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", "k"]),
            helper.make_tensor_value_info("ids", i64, ["batch", "k"]),
            helper.make_tensor_value_info("finite", TensorProto.BOOL, ["batch"]),
        ],
        initializer=[helper.make_tensor("zero32", TensorProto.INT32, [], [0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


class SamplingHead:
    """The head's session, on the providers (and provider options) of the model it serves."""

    def __init__(
        self,
        vocab: int,
        dtype: np.dtype,
        providers: Sequence[str],
        provider_options: Sequence[dict] | None = None,
        intra_op_threads: int = 0,
        guard: Callable[..., Any] | None = None,
    ) -> None:
        self.vocab = vocab
        # How a run is called: the model session's `guarded` (allocation failures and a lost device).
        self._guard = guard or (lambda run, *args: run(*args))
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        apply_thread_pool(options)
        self.session = ort.InferenceSession(
            head_graph(vocab, dtype).SerializeToString(),
            options,
            providers=list(providers),
            provider_options=list(provider_options) if provider_options else None,
        )
        self.provider = self.session.get_providers()[0]

    def rank(self, logits: ort.OrtValue, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values (B, k) float32, ids (B, k) int64, finite (B,) bool) of the logits (B, T, V), wherever they
        are: the head reads them in place and writes its outputs to the host."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_cpu_input("k", np.array([min(k, self.vocab)], dtype=np.int64))
        for name in ("values", "ids", "finite"):
            binding.bind_output(name, "cpu")
        self._guard(self.session.run_with_iobinding, binding)
        values, ids, finite = (v.numpy() for v in binding.get_outputs())
        return values, ids, finite


class DeviceLogits:
    """A decode step's logits, left on the model's device: rows (B, V) that the sampler asks for candidates
    (`top`) or, for the rows that need everything, copies to the host once (`host`). Indexing with a list of
    rows gives those rows (nothing is copied)."""

    __slots__ = ("_rows", "_step")

    def __init__(self, head: SamplingHead, logits: ort.OrtValue) -> None:
        self._step = _Step(head, logits)
        self._rows = np.arange(logits.shape()[0])

    @classmethod
    def _of(cls, step: _Step, rows: np.ndarray) -> DeviceLogits:
        view = cls.__new__(cls)
        view._step, view._rows = step, rows
        return view

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> DeviceLogits:
        return DeviceLogits._of(self._step, self._rows[np.asarray(rows, dtype=np.int64)])

    @property
    def vocab(self) -> int:
        return self._step.head.vocab

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most likely tokens of each row: their logits (R, k) and ids (R, k), most likely first, ties
        by the lower id."""
        values, ids = self._step.top(k)
        return values[self._rows, :k], ids[self._rows, :k]

    def finite(self) -> np.ndarray:
        """Per row: no NaN and no +inf among its logits."""
        return self._step.finite()[self._rows]

    def host(self) -> np.ndarray:
        """The rows' logits (R, V) float32 on the host (the whole step is copied once)."""
        return self._step.host()[self._rows]


class _Step:
    """What was computed of one step's logits, shared by every view of them."""

    __slots__ = ("_finite", "_host", "_ids", "_k", "_values", "head", "logits")

    def __init__(self, head: SamplingHead, logits: ort.OrtValue) -> None:
        self.head, self.logits = head, logits
        self._k = 0
        self._values = self._ids = self._finite = self._host = None

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > self._k:  # one run for the widest a step asks for; narrower views are its prefixes
            self._values, self._ids, self._finite = self.head.rank(self.logits, k)
            self._k = k
        return self._values, self._ids

    def finite(self) -> np.ndarray:
        if self._finite is None:
            self.top(1)
        return self._finite

    def host(self) -> np.ndarray:
        if self._host is None:
            x = self.logits.numpy()[:, -1, : self.head.vocab]
            self._host = x if x.dtype == np.float32 else x.astype(np.float32)
        return self._host
