"""The KV cache of the running decode batch: concatenate and filter.

The exported decoder (Hugging Face/Optimum conventions) takes ``past_key_values.{i}.key|value`` of shape
(batch, heads, past, head_size) and returns ``present`` = past + the new tokens. We keep the present arrays
of the whole running batch as they come out of ONNX Runtime and feed them back at the next step:

- a sequence that leaves (finished, cancelled) is filtered out along the batch axis;
- sequences that join after their prefill are concatenated along the batch axis, the shorter side padded on
  the left (attention mask 0), the layout the graph expects;
- leading columns that no remaining row attends to are trimmed, so the past never outgrows the longest
  live sequence.

With IO binding (CUDA), the arrays stay on the device as ONNX Runtime ``OrtValue``s from step to step; they
come back to the host only when the batch changes (select, join), the one time they must be rearranged.

Why not a preallocated cache: with this graph, ONNX Runtime allocates ``present`` anew each step anyway
(the concatenation is inside the graph), so a preallocated buffer would add a copy rather than save one.
Sharing one buffer between past and present needs a different graph (onnxruntime-genai's
GroupQueryAttention with past_present_share_buffer), which the exporter does not write. Filtering and joining
copy the cache, but only when the batch changes, not at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class KVCache:
    """Keys and values per layer, (B, H, P, D) each, and the attention mask (B, P) of the past."""

    __slots__ = ("keys", "mask", "values")

    def __init__(self, keys: list[np.ndarray], values: list[np.ndarray], mask: np.ndarray) -> None:
        self.keys = keys
        self.values = values
        self.mask = mask

    @classmethod
    def empty(cls, num_layers: int, batch: int, num_heads: int, head_size: int, dtype: type) -> KVCache:
        zero = np.zeros((batch, num_heads, 0, head_size), dtype=dtype)
        return cls([zero] * num_layers, [zero] * num_layers, np.zeros((batch, 0), dtype=np.int64))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def on_host(self) -> KVCache:
        """The same cache with every array in host memory (a device ``OrtValue`` is copied back)."""
        return KVCache([_host(k) for k in self.keys], [_host(v) for v in self.values], self.mask)

    def select(self, rows: Sequence[int]) -> KVCache:
        """Keeps only `rows` (in that order), then trims the columns no kept row attends to."""
        if len(rows) == self.batch and list(rows) == list(range(self.batch)):
            return self  # nothing leaves: keep the arrays where they are (on the device with IO binding)
        host = self.on_host()
        idx = np.asarray(rows, dtype=np.int64)
        mask = host.mask[idx]
        attended = mask.any(axis=0)
        start = int(attended.argmax()) if attended.any() else mask.shape[1]
        return KVCache(
            [k[idx, :, start:] for k in host.keys], [v[idx, :, start:] for v in host.values], mask[:, start:]
        )

    @staticmethod
    def join(a: KVCache, b: KVCache) -> KVCache:
        """`a`'s rows then `b`'s, left-padding the shorter past."""
        if a.batch == 0:
            return b
        if b.batch == 0:
            return a
        a, b = a.on_host(), b.on_host()
        length = max(a.length, b.length)
        return KVCache(
            [_stack_left_padded(x, y, length) for x, y in zip(a.keys, b.keys)],
            [_stack_left_padded(x, y, length) for x, y in zip(a.values, b.values)],
            _stack_left_padded(a.mask, b.mask, length),
        )


def _host(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.numpy()  # an onnxruntime.OrtValue


def _stack_left_padded(x: np.ndarray, y: np.ndarray, length: int) -> np.ndarray:
    """`x`'s rows then `y`'s along axis 0, each right-aligned in `length` along axis 2 (a cache) or 1 (a mask).

    One allocation and one copy of each side: padding first and concatenating after would copy twice.
    """
    axis = 2 if x.ndim == 4 else 1
    shape = list(x.shape)
    shape[0], shape[axis] = x.shape[0] + y.shape[0], length
    out = np.zeros(shape, dtype=x.dtype)
    index: list[slice] = [slice(None)] * x.ndim
    for rows, part in ((slice(0, x.shape[0]), x), (slice(x.shape[0], None), y)):
        index[0], index[axis] = rows, slice(length - part.shape[axis], None)
        out[tuple(index)] = part
    return out
