"""Keeping the accepted rows of a verified block in the KV cache (``hf_spec.engine.cache``).

Every cached key and value below is the position it stands for, so the expected cache after a keep
is the list of positions plain decoding of the accepted sequence would have cached.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicIndexedLayer, DynamicLayer, DynamicSlidingWindowLayer

from hf_spec.engine.cache import check_cache_supported, full_history_cache, keep_block_rows, recording_block
from hf_spec.errors import UnsupportedError
from tests.conftest import tiny_model

WINDOW = 6


def entries(positions) -> torch.Tensor:
    """KV entries of shape (batch 1, heads 2, len, head_dim 3) holding their position."""
    column = torch.as_tensor(positions, dtype=torch.float64).view(1, 1, -1, 1)
    return column.expand(1, 2, -1, 3).contiguous()


def cached_positions(layer) -> list[float]:
    assert torch.equal(layer.keys, layer.values)
    return layer.keys[0, 0, :, 0].tolist()


def cache_with(layer, context_length: int, block_positions: list[float]) -> DynamicCache:
    """One-layer cache: ``context_length`` committed positions, then a draft block written while recording."""
    cache = DynamicCache()
    cache.layers = [layer]
    layer.update(entries(range(context_length)), entries(range(context_length)))
    with recording_block(cache):
        layer.update(entries(block_positions), entries(block_positions))
    return cache


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


# Block rows (root first) are labelled 100 + row; the accepted path is rows 0, 2, 3 (not a prefix).
BLOCK = [100.0, 101.0, 102.0, 103.0, 104.0]
KEPT = [0, 2, 3]


def test_non_prefix_keep_moves_rows_in_place_in_a_full_layer():
    layer = DynamicLayer()
    cache = cache_with(layer, 7, BLOCK)
    key_storage, value_storage = storage(layer.keys), storage(layer.values)
    keep_block_rows(cache, 7, KEPT)
    assert cached_positions(layer) == list(range(7)) + [100.0, 102.0, 103.0]
    assert cache.get_seq_length() == 10
    # No copy of the whole cache: the kept rows were written into the existing storage.
    assert (storage(layer.keys), storage(layer.values)) == (key_storage, value_storage)


def test_prefix_keep_is_a_crop():
    layer = DynamicLayer()
    cache = cache_with(layer, 7, BLOCK)
    key_storage = storage(layer.keys)
    keep_block_rows(cache, 7, [0, 1])
    assert cached_positions(layer) == list(range(7)) + [100.0, 101.0]
    assert storage(layer.keys) == key_storage


@pytest.mark.parametrize("context_length", [2, 5, 30])  # below the window, right below it, far past it
def test_sliding_layer_keeps_the_last_window_positions_of_the_accepted_sequence(context_length):
    layer = DynamicSlidingWindowLayer(sliding_window=WINDOW)
    cache = cache_with(layer, context_length, BLOCK)
    assert layer.keys.shape[-2] == min(context_length, WINDOW - 1) + len(BLOCK)  # the block was recorded whole
    key_storage = storage(layer.keys)
    keep_block_rows(cache, context_length, KEPT)
    accepted = list(range(context_length)) + [100.0, 102.0, 103.0]
    assert cached_positions(layer) == accepted[-(WINDOW - 1):]
    assert layer.get_seq_length() == cache.get_seq_length() == context_length + len(KEPT)
    assert storage(layer.keys) == key_storage
    assert layer.record_past is False  # recording was switched off again after the block


def test_sliding_layer_prefix_keep_past_the_window():
    """transformers' own crop refuses this (the window was reached without past recording)."""
    layer = DynamicSlidingWindowLayer(sliding_window=WINDOW)
    cache = cache_with(layer, 30, BLOCK)
    keep_block_rows(cache, 30, [0])
    assert cached_positions(layer) == [float(p) for p in range(26, 30)] + [100.0]
    assert layer.get_seq_length() == 31


def test_a_cache_mixing_layer_kinds_is_kept_consistently():
    full, sliding = DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=WINDOW)
    cache = DynamicCache()
    cache.layers = [sliding, full]
    for layer in cache.layers:
        layer.update(entries(range(20)), entries(range(20)))
    with recording_block(cache):
        for layer in cache.layers:
            layer.update(entries(BLOCK), entries(BLOCK))
    keep_block_rows(cache, 20, KEPT)
    accepted = list(range(20)) + [100.0, 102.0, 103.0]
    assert cached_positions(full) == accepted
    assert cached_positions(sliding) == accepted[-(WINDOW - 1):]
    assert full.get_seq_length() == sliding.get_seq_length() == 23


def test_bad_rows_are_refused():
    cache = cache_with(DynamicLayer(), 3, BLOCK)
    with pytest.raises(ValueError, match="increasing"):
        keep_block_rows(cache, 3, [0, 2, 1])
    with pytest.raises(ValueError, match="outside the block"):
        keep_block_rows(cache, 3, [0, 5])


def test_full_history_cache_replaces_sliding_layers_only():
    model = tiny_model("gemma3", sliding_window=16, num_hidden_layers=3,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    assert [type(layer) for layer in DynamicCache(config=model.config).layers] == [
        DynamicSlidingWindowLayer, DynamicLayer, DynamicSlidingWindowLayer]
    assert [type(layer) for layer in full_history_cache(model.config).layers] == [DynamicLayer] * 3


def test_unsupported_cache_layers_are_refused():
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), DynamicIndexedLayer()]
    with pytest.raises(UnsupportedError, match="DynamicIndexedLayer"):
        check_cache_supported(cache)
