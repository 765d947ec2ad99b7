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

A selection is recorded, not copied at once: the rows are gathered when the arrays are next read (the next
decode step) or, when sequences join first, in the same pass as the join, so a batch that loses rows at the
end of one step and gains rows at the next boundary is copied once, not twice. Rows are copied one by one
into their place (no temporary array of the selected rows).

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
    """Keys and values per layer, (B, H, P, D) each, and the attention mask (B, P) of the past.

    `rows` and `start` describe a selection not applied yet: row r of this cache is row rows[r] of the arrays
    given, from column `start` on (None: the arrays as they are)."""

    __slots__ = ("_keys", "_rows", "_start", "_values", "mask")

    def __init__(
        self,
        keys: list[Any],
        values: list[Any],
        mask: np.ndarray,
        rows: np.ndarray | None = None,
        start: int = 0,
    ) -> None:
        self._keys = keys
        self._values = values
        self.mask = mask
        self._rows = rows
        self._start = start

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

    @property
    def keys(self) -> list[Any]:
        """Per layer, (B, H, P, D): a host array, or a device ``OrtValue`` while no selection changed it."""
        self._apply_selection()
        return self._keys

    @property
    def values(self) -> list[Any]:
        self._apply_selection()
        return self._values

    def _apply_selection(self) -> None:
        if self._rows is None:
            return
        rows, start, length = self._rows, self._start, self.length
        self._keys = [_place([(_host(x), rows, start)], length) for x in self._keys]
        self._values = [_place([(_host(x), rows, start)], length) for x in self._values]
        self._rows, self._start = None, 0

    def select(self, rows: Sequence[int]) -> KVCache:
        """Keeps only `rows` (in that order), then trims the columns no kept row attends to. Records the
        selection; the arrays are gathered when next read, or by `join`."""
        if len(rows) == self.batch and list(rows) == list(range(self.batch)):
            return self  # nothing leaves: keep the arrays where they are (on the device with IO binding)
        if not len(rows):  # everything leaves: keep nothing alive while the model is idle
            return KVCache([], [], np.zeros((0, 0), dtype=self.mask.dtype))
        idx = np.asarray(rows, dtype=np.int64)
        mask = self.mask[idx]
        attended = mask.any(axis=0)
        trim = int(attended.argmax()) if attended.any() else mask.shape[1]
        base = idx if self._rows is None else self._rows[idx]
        return KVCache(self._keys, self._values, mask[:, trim:], base, self._start + trim)

    def release(self) -> None:
        """Nothing to free: the arrays go with the object (the slot cache frees its slots here)."""

    @staticmethod
    def join(a: KVCache, b: KVCache) -> KVCache:
        """`a`'s rows then `b`'s, left-padding the shorter past; pending selections are applied in the same
        pass."""
        if a.batch == 0:
            return b
        if b.batch == 0:
            return a
        length = max(a.length, b.length)
        mask = np.zeros((a.batch + b.batch, length), dtype=a.mask.dtype)
        mask[: a.batch, length - a.length :] = a.mask
        mask[a.batch :, length - b.length :] = b.mask

        def joined(xa: Any, xb: Any) -> np.ndarray:
            return _place([(_host(xa), a._rows, a._start), (_host(xb), b._rows, b._start)], length)

        return KVCache(
            [joined(x, y) for x, y in zip(a._keys, b._keys)],
            [joined(x, y) for x, y in zip(a._values, b._values)],
            mask,
        )


def _host(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.numpy()  # an onnxruntime.OrtValue


def _place(parts: list[tuple[np.ndarray, np.ndarray | None, int]], length: int) -> np.ndarray:
    """One (B, H, length, D) array of the parts' rows, one part after the other, each right-aligned (left
    padding of zeros). A part is (array, rows or None for all, first column): its rows are copied straight
    into place, one copy each."""
    first = parts[0][0]
    count = sum(x.shape[0] if rows is None else len(rows) for x, rows, _ in parts)
    out = np.zeros((count, first.shape[1], length, first.shape[3]), dtype=first.dtype)
    row = 0
    for x, rows, start in parts:
        columns = slice(length - (x.shape[2] - start), length)
        if rows is None:
            out[row : row + x.shape[0], :, columns] = x[:, :, start:]
            row += x.shape[0]
        else:
            for r in rows:
                out[row, :, columns] = x[r, :, start:]
                row += 1
    return out
