"""KV-cache bookkeeping: after verification keep only the root and the accepted path.

Sliding-window layers (Gemma 3, Qwen2 with ``use_sliding_window``) keep only the last
``window - 1`` positions in transformers' ``DynamicSlidingWindowLayer``, so a forward over a draft
block would drop history that is needed again once rejected rows are thrown away. The engine
therefore lets those layers record the whole block during a speculative forward (transformers'
own ``record_past`` switch, the one its assisted decoding uses) and trims them back to
``window - 1`` positions when it keeps the accepted rows. Memory stays bounded by the window plus
one block, exactly as in plain decoding plus the draft.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import UnsupportedError

_SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def check_cache_supported(cache) -> None:
    """Raise a clear error for caches the engine cannot roll back."""
    if type(cache) is not DynamicCache:
        raise UnsupportedError(
            f"hf_spec needs a transformers DynamicCache, got {type(cache).__name__}. Remove "
            "`cache_implementation=...` / the `past_key_values` you passed (static, offloaded and quantized "
            "caches cannot drop rejected draft tokens yet)."
        )
    for layer in cache.layers:
        if type(layer) not in _SUPPORTED_LAYERS:
            raise UnsupportedError(
                f"Cache layer type {type(layer).__name__} is not supported by hf_spec (only full-attention and "
                "sliding-window attention layers can be rolled back); use plain generate()."
            )


def full_history_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose sliding-window layers keep their whole history.

    The model's attention masks still apply the window (transformers sizes them from the cache and
    masks keys older than the window), so outputs are unchanged. A drafter that grows a tree over
    several forwards before rolling back needs this: between roll-backs its cache holds earlier tree
    levels as well as the context, more than a ``window - 1`` sliding layer keeps visible.
    """
    cache = DynamicCache(config=config)
    check_cache_supported(cache)
    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer for layer in cache.layers]
    return cache


@contextmanager
def recording_block(cache):
    """Let sliding-window layers keep every position written inside the ``with`` block.

    A speculative forward writes a whole draft block; until ``keep_block_rows`` has dropped the
    rejected rows, the positions just before the block must not be evicted.
    """
    sliding = [layer for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer)]
    before = [layer.record_past for layer in sliding]
    for layer in sliding:
        layer.record_past = True
    try:
        yield
    finally:
        for layer, recording in zip(sliding, before):
            layer.record_past = recording


def keep_block_rows(cache: DynamicCache, block_start: int, rows: list[int]) -> None:
    """Keep, of the block of KV entries written from position ``block_start``, only ``rows``.

    ``rows`` are block rows in increasing order (root first). Unless they are a prefix ``0..k-1``
    (the chain case), the kept rows are first moved in place to the start of the block; then every
    layer is cut after them. The work is proportional to the kept rows, not to the context.
    Sliding-window layers are trimmed back to their last ``window - 1`` positions.
    """
    if rows != sorted(set(rows)) or (rows and rows[0] < 0):
        raise ValueError(f"rows must be distinct block rows in increasing order, got {rows}.")
    moved = rows != list(range(len(rows)))
    for layer in cache.layers:
        if layer.is_initialized:
            _keep_layer_rows(layer, block_start, rows, moved)


def _keep_layer_rows(layer, block_start: int, rows: list[int], moved: bool) -> None:
    stored = layer.keys.shape[-2]
    block_length = layer.get_seq_length() - block_start  # a sliding layer stores only the tail of the sequence
    first = stored - block_length  # where the block starts in this layer's storage
    if rows and rows[-1] >= block_length:
        raise ValueError(f"row {rows[-1]} is outside the block of {block_length} rows written from {block_start}.")
    end = first + len(rows)
    if moved:
        index = torch.tensor(rows, device=layer.keys.device) + first
        for tensor in (layer.keys, layer.values):
            tensor[:, :, first:end] = tensor[:, :, index]  # the gather copies first, so overlap is harmless
    start = 0
    if isinstance(layer, DynamicSlidingWindowLayer):
        start = max(end - (layer.sliding_window - 1), 0)
        layer.cumulative_length = block_start + len(rows)
    layer.keys = layer.keys[:, :, start:end]
    layer.values = layer.values[:, :, start:end]
