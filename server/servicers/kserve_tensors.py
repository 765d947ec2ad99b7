"""Tensors of the Open Inference Protocol (KServe v2, Triton's gRPC wire format) to Python values and back:
pure functions, no gRPC, no model. Every problem is an InvalidInput naming the tensor.

Inputs come either as typed lists (`contents.int64_contents`, `contents.bytes_contents`...) or as raw
little-endian bytes (`raw_input_contents`, one entry per input, in order); a BYTES element in raw form is a
4-byte little-endian length followed by the bytes. Outputs always go out raw (`raw_output_contents`), as
Triton sends them and tritonclient and perf_analyzer read them.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInput, shown
from .oip import grpc_service_pb2 as pb

BYTES = "BYTES"
# Each datatype: its numpy dtype (little-endian) and the field of InferTensorContents that holds it (None: raw only).
DTYPES: dict[str, tuple[np.dtype | None, str | None]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), None),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    BYTES: (None, "bytes_contents"),
}
INTEGERS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
FLOATS = ("FP16", "FP32", "FP64")
# model_config.proto's DataType of each datatype (BYTES is TYPE_STRING there).
CONFIG_TYPES = {name: pb.DataType.Value(f"TYPE_{'STRING' if name == BYTES else name}") for name in DTYPES}
_LENGTH = struct.Struct("<I")
_PLAIN_NAME = re.compile(r"[\w.\-]{1,64}")


def named(name: str) -> str:
    """A tensor's name as an error's field: as it is when it is a plain name, else quoted and cut."""
    return name if _PLAIN_NAME.fullmatch(name) else shown(name)


@dataclass(frozen=True, slots=True)
class Tensor:
    """One input: its shape, and its elements flattened (a numpy array, or a list of bytes for BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]

    def __len__(self) -> int:
        return len(self.data)


def read_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """The request's input tensors by name, decoded and checked against their shapes."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            "raw_input_contents",
            f"{len(raw)} entries for {len(request.inputs)} inputs (one per input, in order)",
        )
    tensors: dict[str, Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in tensors:
            raise InvalidInput(named(name), "given twice")
        tensors[name] = _read(tensor, raw[i] if raw else None)
    return tensors


def _read(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name = named(tensor.name) if tensor.name else "inputs[].name"
    if not tensor.name:
        raise InvalidInput(name, "an input without a name")
    if tensor.datatype not in DTYPES:
        raise InvalidInput(name, f"unknown datatype {shown(tensor.datatype)} (one of {', '.join(DTYPES)})")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(name, f"shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    dtype, field = DTYPES[tensor.datatype]
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(name, "data in both contents and raw_input_contents")
        data = _raw_bytes(name, raw, count) if dtype is None else _raw_array(name, raw, dtype, count)
    else:
        if field is None:
            raise InvalidInput(name, f"{tensor.datatype} data must come in raw_input_contents")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidInput(name, f"{len(values)} elements in contents.{field} for shape {list(shape)}")
        data = list(values) if dtype is None else np.asarray(values).astype(dtype)
    return Tensor(tensor.name, tensor.datatype, shape, data)


def _raw_array(name: str, raw: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(name, f"{len(raw)} bytes of raw data, expected {count} x {dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def _raw_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """Splits raw BYTES data: each element a 4-byte little-endian length, then that many bytes."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidInput(name, f"raw BYTES data ends inside the length of element {len(items)}")
        (size,) = _LENGTH.unpack_from(raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidInput(
                name, f"raw BYTES element {len(items)} says {size} bytes, {len(raw) - at} are left"
            )
        items.append(raw[at : at + size])
        at += size
    if len(items) != count:
        raise InvalidInput(name, f"{len(items)} BYTES elements in raw data for {count} elements of the shape")
    return items


def encode_bytes(items: Iterable[bytes]) -> bytes:
    """Raw BYTES data: each element length-prefixed (4 bytes, little-endian)."""
    return b"".join(_LENGTH.pack(len(b)) + b for b in items)


def add_output(
    response: pb.ModelInferResponse,
    name: str,
    datatype: str,
    shape: Sequence[int],
    data: np.ndarray | list[bytes],
) -> None:
    """Appends one output tensor, its data raw in `raw_output_contents` (as Triton sends it)."""
    response.outputs.add(name=name, datatype=datatype, shape=shape)
    if datatype == BYTES:
        response.raw_output_contents.append(encode_bytes(data))
    else:
        response.raw_output_contents.append(np.ascontiguousarray(data, dtype=DTYPES[datatype][0]).tobytes())


# ------------------------------------------------------------------------------------------------------------
# Typed values of inputs and request parameters


def texts(tensor: Tensor) -> list[str]:
    """A BYTES tensor of shape [N] or [N, 1] as N strings (UTF-8)."""
    name = named(tensor.name)
    expect(tensor, BYTES)
    if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
        raise InvalidInput(name, f"shape {list(tensor.shape)}, expected [N] or [N, 1]")
    return [_utf8(f"{name}[{i}]", b) for i, b in enumerate(tensor.data)]


def strings(tensor: Tensor) -> list[str]:
    """Every element of a BYTES tensor, whatever its shape, as strings (UTF-8)."""
    expect(tensor, BYTES)
    return [_utf8(f"{named(tensor.name)}[{i}]", b) for i, b in enumerate(tensor.data)]


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(name, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def expect(tensor: Tensor, *datatypes: str) -> None:
    if tensor.datatype not in datatypes:
        raise InvalidInput(
            named(tensor.name), f"datatype {tensor.datatype}, expected {' or '.join(datatypes)}"
        )


def _one(tensor: Tensor) -> object:
    if len(tensor) != 1:
        raise InvalidInput(
            named(tensor.name), f"shape {list(tensor.shape)}, expected one element ([1] or [1, 1])"
        )
    return tensor.data[0]


def integer(tensor: Tensor) -> int:
    expect(tensor, *INTEGERS)
    return int(_one(tensor))


def number(tensor: Tensor) -> float:
    expect(tensor, *FLOATS, *INTEGERS)
    return float(_one(tensor))


def boolean(tensor: Tensor) -> bool:
    expect(tensor, "BOOL")
    return bool(_one(tensor))


def parameter(p: pb.InferParameter) -> bool | int | float | str | None:
    """The value of a request parameter, whichever of its kinds is set (None: none is)."""
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind is not None else None
