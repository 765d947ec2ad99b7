"""The KV cache's batch operations: select keeps rows and trims dead columns; join left-pads."""

from __future__ import annotations

import numpy as np

from server.generation.kv_cache import KVCache


def cache(rows: list[list[int]], layers: int = 2) -> KVCache:
    """A cache whose key/value entries equal the mask, per row, so padding is visible."""
    mask = np.array(rows, dtype=np.int64)
    kv = mask[:, None, :, None].astype(np.float32) * np.arange(1, 3, dtype=np.float32)  # (B, 1, P, 2)
    return KVCache([kv.copy() for _ in range(layers)], [kv.copy() * 10 for _ in range(layers)], mask)


def test_select_keeps_rows_in_order_and_trims_columns_nobody_attends():
    c = cache([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    s = c.select([2, 1])
    assert s.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert s.keys[0].shape == (2, 1, 3, 2)
    np.testing.assert_array_equal(s.keys[1][:, 0, :, 0], s.mask)
    np.testing.assert_array_equal(s.values[0][:, 0, :, 1], s.mask * 20)


def test_join_left_pads_the_shorter_past():
    a = cache([[1, 1]])
    b = cache([[1, 1, 1, 1], [0, 1, 1, 1]])
    j = KVCache.join(a, b)
    assert j.batch == 3 and j.length == 4
    assert j.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    for layer in range(2):
        np.testing.assert_array_equal(j.keys[layer][:, 0, :, 0], j.mask)
        np.testing.assert_array_equal(j.values[layer][:, 0, :, 0], j.mask * 10)


def test_empty_cache_has_zero_length():
    e = KVCache.empty(num_layers=3, batch=2, num_heads=4, head_size=8, dtype=np.float32)
    assert e.length == 0 and e.batch == 2 and len(e.keys) == 3 and e.keys[0].shape == (2, 4, 0, 8)


def test_keeping_every_row_keeps_the_arrays_where_they_are():
    c = cache([[1, 1], [0, 1]])
    assert c.select([0, 1]) is c


def test_device_values_come_back_to_the_host_when_the_batch_changes():
    import onnxruntime as ort

    c = cache([[1, 1, 1], [0, 1, 1]])
    on_device = KVCache(
        [ort.OrtValue.ortvalue_from_numpy(k) for k in c.keys],
        [ort.OrtValue.ortvalue_from_numpy(v) for v in c.values],
        c.mask,
    )
    s = on_device.select([1])
    assert isinstance(s.keys[0], np.ndarray) and s.mask.tolist() == [[1, 1]]
    np.testing.assert_array_equal(s.keys[0], c.select([1]).keys[0])
    j = KVCache.join(on_device, cache([[1]]))
    np.testing.assert_array_equal(j.values[1], KVCache.join(c, cache([[1]])).values[1])


def test_a_selection_applied_by_a_join_equals_one_applied_before_it():
    c = cache([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    newcomers = cache([[0, 1, 1], [1, 1, 1]]).select([1])
    lazy = KVCache.join(c.select([3, 2]).select([1, 0]), newcomers)  # two selections, applied by the join
    eager = c.select([2, 3])
    eager_keys, eager_values = [k.copy() for k in eager.keys], [v.copy() for v in eager.values]  # applied now
    want_mask = [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert lazy.mask.tolist() == want_mask and lazy.batch == 3
    for layer in range(2):
        np.testing.assert_array_equal(lazy.keys[layer][:, 0, :, 0], lazy.mask)
        np.testing.assert_array_equal(lazy.values[layer][:, 0, :, 1], lazy.mask * 20)
        np.testing.assert_array_equal(lazy.keys[layer][:2, :, -2:], eager_keys[layer])
        np.testing.assert_array_equal(lazy.values[layer][:2, :, -2:], eager_values[layer])


def test_a_selection_copies_nothing_until_read():
    c = cache([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    s = c.select([2, 0])
    assert s._rows is not None  # recorded only
    assert np.shares_memory(s._keys[0], c.keys[0])
    assert s.keys[0].shape == (2, 1, 3, 2) and s._rows is None  # read: gathered, once
    assert not np.shares_memory(s.keys[0], c.keys[0])
    np.testing.assert_array_equal(s.keys[0][:, 0, :, 0], [[0, 0, 1], [1, 1, 1]])


def test_random_chains_of_selections_and_joins_match_plain_numpy():
    """Distinct data per layer, head, row and column: a row, layer or column mix-up shows."""
    rng = np.random.default_rng(0)

    def random_cache(batch: int, length: int) -> tuple[KVCache, list[np.ndarray], list[np.ndarray], np.ndarray]:
        mask = np.ones((batch, length), dtype=np.int64)
        for row in range(batch):
            mask[row, : rng.integers(0, length)] = 0  # left padding of random width
        keys = [rng.normal(size=(batch, 3, length, 4)).astype(np.float32) for _ in range(2)]
        values = [rng.normal(size=(batch, 3, length, 4)).astype(np.float32) for _ in range(2)]
        return KVCache([k.copy() for k in keys], [v.copy() for v in values], mask.copy()), keys, values, mask

    def ref_select(keys, values, mask, rows):
        if rows == list(range(mask.shape[0])):
            return keys, values, mask  # nobody leaves: nothing is copied, nothing trimmed
        mask = mask[rows]
        attended = mask.any(axis=0)
        start = int(attended.argmax()) if attended.any() else mask.shape[1]
        return [k[rows][:, :, start:] for k in keys], [v[rows][:, :, start:] for v in values], mask[:, start:]

    def ref_join(a, b):
        length = max(a[2].shape[1], b[2].shape[1])

        def pad(x, axis):
            width = [(0, 0)] * x.ndim
            width[axis] = (length - x.shape[axis], 0)
            return np.pad(x, width)

        return (
            [np.concatenate([pad(x, 2), pad(y, 2)]) for x, y in zip(a[0], b[0])],
            [np.concatenate([pad(x, 2), pad(y, 2)]) for x, y in zip(a[1], b[1])],
            np.concatenate([pad(a[2], 1), pad(b[2], 1)]),
        )

    for _ in range(200):
        cache, *ref = random_cache(int(rng.integers(1, 6)), int(rng.integers(1, 8)))
        for _ in range(int(rng.integers(1, 5))):
            if rng.random() < 0.5 and cache.batch > 0:
                rows = rng.choice(cache.batch, size=int(rng.integers(1, cache.batch + 1)), replace=False).tolist()
                cache, ref = cache.select(rows), ref_select(*ref, rows)
            else:
                other, *other_ref = random_cache(int(rng.integers(1, 4)), int(rng.integers(1, 8)))
                if rng.random() < 0.5:
                    keep = list(range(other.batch))[::-1]
                    other, other_ref = other.select(keep), ref_select(*other_ref, keep)
                cache, ref = KVCache.join(cache, other), ref_join(ref, other_ref)
        np.testing.assert_array_equal(cache.mask, ref[2])
        for got, want in zip(cache.keys + cache.values, ref[0] + ref[1]):
            np.testing.assert_array_equal(got, want)


def test_selecting_no_row_keeps_no_array_alive():
    keys = [np.ones((2, 1, 3, 2), np.float32)]
    cache = KVCache(keys, [np.ones((2, 1, 3, 2), np.float32)], np.ones((2, 3), np.int64))
    empty = cache.select([])
    assert empty.batch == 0 and empty.keys == [] and empty.values == []
    joined = KVCache.join(empty, cache)
    assert joined is cache
