"""A preallocated KV cache whose past and present share one buffer: the cache of GroupQueryAttention graphs.

Graphs written by the onnxruntime-genai model builder (docs/model-repository.md, "shared-buffer decoders")
take ``past_key_values.{i}.key|value`` of shape (batch, kv_heads, max_length, head_size) and write the new
tokens' keys and values into the same memory, at each row's own length (the op reads a row's length from its
attention mask). So the cache is allocated once, per layer, as (slots, kv_heads, max_length, head_size), and
a sequence owns one slot (one row) from its prefill to its end:

- a join writes only the new sequence's prefill, into a free slot; nothing else moves;
- a leave frees the slot; nothing is copied or compacted;
- a decode step binds the buffers from slot 0 to the highest slot in use, with idle slots in between fed a
  dummy token under a one-token mask (their output is ignored). Free slots are handed out lowest first, so
  holes fill with the next arrivals.

The buffers are numpy arrays on the CPU, or ONNX Runtime ``OrtValue``s on the device with CUDA: either way
ONNX Runtime is given a pointer into them (``IOBinding.bind_input/bind_output`` with a buffer address), so the
cache never leaves the device. A numpy buffer is written through once when it is allocated, so that all
of its memory is the process's from the start: the GroupQueryAttention op touches the whole row of a slot it
writes, and the first write into each untouched slot cost 200-500 ms of page faults (SmolLM2, 2 CPU cores),
stalling every running stream; committing the 1.4 GiB of SmolLM2's default cache takes about 3 s at start.

A slot keeps what its prompt wrote after its sequence ends (prefix caching, vLLM's "automatic prefix
caching" on slots): the pool records which prompt tokens each slot's positions 0..n-1 hold, and a new prompt
that begins with tokens some slot holds (a shared system prompt, the same chat template, an earlier turn)
gets those positions copied into its own slot and is prefilled from there on (`reuse`). Keys and values of a
position depend only on the tokens up to it, so the copy is what a prefill would write, up to the rounding
of a different batch shape (as with chunked prefill). Only what prompts wrote is recorded, not the generated
tokens.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from ..errors import Overloaded

# The fewest tokens a prompt takes from the cache (vLLM caches blocks of 16): a shorter match, such as the
# beginning-of-sequence token every prompt of a Llama starts with, would only keep the prompt from being
# prefilled in one call with others of its length (a prompt with past tokens is written alone).
REUSE_MIN_TOKENS = 16


class SlotPool:
    """The buffers and which slots are free."""

    def __init__(
        self,
        num_layers: int,
        slots: int,
        kv_heads: int,
        max_length: int,
        head_size: int,
        dtype: type,
        device: str = "cpu",
        device_id: int = 0,
    ) -> None:
        self.slots = slots
        self.max_length = max_length
        self.row_shape = (kv_heads, max_length, head_size)
        self.dtype = np.dtype(dtype)
        self.device = device
        self.device_id = device_id
        shape = (slots, *self.row_shape)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        if device == "cpu":
            self._buffers = [np.empty(shape, self.dtype) for _ in range(2 * num_layers)]
            for buffer in self._buffers:
                buffer.fill(0)  # every page resident now, not at a slot's first prefill
            self._pointers = [b.ctypes.data for b in self._buffers]
        else:  # UNVERIFIED without a GPU: device memory through ONNX Runtime's own allocator
            self._buffers = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype.type, device, device_id)
                for _ in range(2 * num_layers)
            ]
            self._pointers = [b.data_ptr() for b in self._buffers]
        self._free = list(range(slots))
        heapq.heapify(self._free)
        # The prompt tokens whose keys and values each slot holds at its positions 0..n-1.
        self._held: list[list[int]] = [[] for _ in range(slots)]

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise Overloaded("no free KV-cache slot")
        return heapq.heappop(self._free)

    def release(self, slots: Sequence[int]) -> None:
        for slot in slots:
            if slot in self._free:  # two sequences would then share a slot: a bug, stop it here
                raise RuntimeError(f"KV-cache slot {slot} freed twice")
            heapq.heappush(self._free, int(slot))

    def reset(self) -> None:
        """Every slot free again and holding nothing (after a failure dropped the running batch)."""
        self._free = list(range(self.slots))
        heapq.heapify(self._free)
        self._held = [[] for _ in range(self.slots)]

    def held(self, slot: int) -> int:
        """How many prompt tokens `slot` holds from position 0 (a decode step's dummy token for an idle slot
        goes after them, where it overwrites nothing held)."""
        return len(self._held[slot])

    def writing(self, slot: int, start: int) -> None:
        """Before a call writes `slot` from position `start` on: what it held there is no longer known."""
        del self._held[slot][start:]

    def wrote(self, slot: int, start: int, ids: Sequence[int]) -> None:
        """After a call wrote the prompt tokens `ids` into `slot` from position `start`."""
        held = self._held[slot]
        del held[start:]
        if len(held) == start:  # otherwise what precedes them is not known: record nothing past it
            held.extend(ids)

    def reuse(self, slot: int, ids: Sequence[int]) -> int:
        """Gives `slot` (just taken) the longest beginning of the prompt `ids` that a slot holds, copied from
        that slot's positions when it is another one; returns how many tokens it now holds: 0, or from
        REUSE_MIN_TOKENS to all but the last (a prompt's last token is computed, for its logits). With the cache
        on a device only `slot`'s own content counts (no copy between slots there yet)."""
        limit = len(ids) - 1
        candidates = range(self.slots) if self.device == "cpu" else (slot,)
        best, source = 0, slot
        for other in candidates:
            n = _common_prefix(self._held[other], ids, limit)
            if n > best or (n == best and other == slot):
                best, source = n, other
        if best < REUSE_MIN_TOKENS:
            best = 0
        elif source != slot:
            for buffer in self._buffers:
                buffer[slot, :, :best] = buffer[source, :, :best]
        self._held[slot] = list(ids[:best])
        return best

    def pointers(self, first_slot: int) -> list[int]:
        """Addresses of row `first_slot` in every buffer: layer 0 key, layer 0 value, layer 1 key, ..."""
        offset = first_slot * self.row_bytes
        return [p + offset for p in self._pointers]

    def host_rows(self, buffer: int, slot: int, length: int) -> np.ndarray:
        """A copy of one slot's first `length` positions of buffer `buffer` (tests and debugging)."""
        b = self._buffers[buffer]
        rows = b[slot] if isinstance(b, np.ndarray) else b.numpy()[slot]
        return np.array(rows[:, :length])


def _common_prefix(a: list[int], b: Sequence[int], limit: int) -> int:
    """How many tokens `a` and `b` share from the first, at most `limit`."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    if a[:n] == list(b[:n]):
        return n
    return int(np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0])


class SlotCache:
    """The running batch's view of the pool: row r of the batch is slot `slots[r]`, holding `lengths[r]`
    tokens. Selecting rows frees the slots of the rows left out; nothing moves."""

    __slots__ = ("lengths", "pool", "slots")

    def __init__(self, pool: SlotPool, slots: Sequence[int], lengths: Sequence[int]) -> None:
        self.pool = pool
        self.slots = list(slots)
        self.lengths = list(lengths)

    @property
    def batch(self) -> int:
        return len(self.slots)

    def select(self, rows: Sequence[int]) -> SlotCache:
        kept = set(rows)
        self.pool.release([s for r, s in enumerate(self.slots) if r not in kept])
        return SlotCache(self.pool, [self.slots[r] for r in rows], [self.lengths[r] for r in rows])

    def release(self) -> None:
        """Frees every slot of this batch (it is being dropped)."""
        self.pool.release(self.slots)
        self.slots, self.lengths = [], []

    @staticmethod
    def join(a: SlotCache, b: SlotCache) -> SlotCache:
        return SlotCache(a.pool, a.slots + b.slots, a.lengths + b.lengths)
