"""The KV cache at the model level: chunked prefill and decode equal one full forward pass."""

from __future__ import annotations

import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.nn import KVCache


def positions(start: int, stop: int, batch: int) -> np.ndarray:
    return np.broadcast_to(np.arange(start, stop, dtype=np.int32), (batch, stop - start))


def test_prefill_in_chunks_then_decode_equals_one_forward_pass(hub_checkpoint, long_tokens, tiny_config):
    model = gptoss_jax.load(hub_checkpoint, dtype="float32")
    batch, length = long_tokens.shape
    full = np.asarray(model(long_tokens))

    cache = KVCache.create(tiny_config, batch, 128, "float32")
    # The second chunk is longer than the sliding window, so ring slots are written more than once.
    split = 30
    assert length - split - 1 > tiny_config.sliding_window
    first, cache = model(long_tokens[:, :split], positions(0, split, batch), cache)
    second, cache = model(long_tokens[:, split:-1], positions(split, length - 1, batch), cache)
    last, cache = model(long_tokens[:, -1:], positions(length - 1, length, batch), cache)
    chunked = np.concatenate([first, second, last], axis=1)

    scale = np.abs(full).max()
    assert np.abs(chunked - full).max() / scale <= 1e-5


@pytest.mark.quick
def test_padding_positions_are_never_stored(tiny_config):
    cache = KVCache.create(tiny_config, 1, 64, "float32").layers[0].group(0, False)
    keys = np.ones((1, 3, tiny_config.num_kv_heads, tiny_config.head_dim), np.float32)
    written = cache.write(keys, keys, np.array([[0, 1, -1]], np.int32))
    assert sorted(np.asarray(written.positions)[0].tolist())[-2:] == [0, 1]
    assert (np.asarray(written.positions)[0] >= 0).sum() == 2


@pytest.mark.quick
def test_sliding_layers_keep_a_ring_of_window_slots(tiny_config):
    cache = KVCache.create(tiny_config, 2, 1024, "bfloat16")
    slots = [layer.positions.shape[-1] for layer in cache.layers]
    assert slots == [tiny_config.sliding_window, 1024]  # (sliding, full) pattern


@pytest.mark.quick
def test_a_decode_write_by_select_stores_what_the_scatter_stores(tiny_config):
    # The TPU's way of writing a decode step (a select over the slots) against the scatter: rows at
    # different positions, one past the ring's end (it wraps), one padding row (stored nowhere).
    rng = np.random.default_rng(0)
    cache = KVCache.create(tiny_config, 3, 64, "float32").layers[0].group(0, False)  # the sliding ring
    shape = (3, 1, tiny_config.num_kv_heads, tiny_config.head_dim)
    keys, values = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    at = np.array([[5], [tiny_config.sliding_window + 2], [-1]], np.int32)
    scattered = cache.write(keys, values, at)
    selected = cache.write(keys, values, at, select=True)
    for ours, expected in zip((selected.keys, selected.values, selected.positions),
                              (scattered.keys, scattered.values, scattered.positions)):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    assert np.asarray(selected.positions)[1, 2] == tiny_config.sliding_window + 2
