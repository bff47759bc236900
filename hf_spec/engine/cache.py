"""KV-cache bookkeeping: after verification keep only the root and the accepted path."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import UnsupportedError

_SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def check_cache_supported(cache, max_total_length: int) -> None:
    """Raise a clear error for caches the engine cannot roll back."""
    if type(cache) is not DynamicCache:
        raise UnsupportedError(
            f"hf_spec needs a transformers DynamicCache, got {type(cache).__name__}. Remove "
            "`cache_implementation=...` / the `past_key_values` you passed (static, offloaded and quantized "
            "caches cannot drop rejected draft tokens yet)."
        )
    for layer in cache.layers:
        if type(layer) not in _SUPPORTED_LAYERS:
            raise UnsupportedError(f"Cache layer type {type(layer).__name__} is not supported by hf_spec.")
        if isinstance(layer, DynamicSlidingWindowLayer) and max_total_length >= layer.sliding_window:
            raise UnsupportedError(
                f"This model uses sliding-window attention (window {layer.sliding_window}) and this call can "
                f"reach {max_total_length} tokens; hf_spec cannot yet roll back a sliding-window cache past "
                "the window. Lower max_new_tokens (prompt + new tokens + draft below the window) or use "
                "plain generate()."
            )


def keep_block_rows(cache: DynamicCache, block_start: int, rows: list[int]) -> None:
    """Keep, of the block of KV entries written from position ``block_start``, only ``rows``.

    ``rows`` are block rows in increasing order (root first). A prefix ``0..k-1`` is a plain crop
    (the chain case); otherwise the kept rows are gathered together in every layer.
    """
    is_prefix = rows == list(range(len(rows)))
    new_length = block_start + len(rows)
    if is_prefix:
        cache.crop(new_length - cache.get_seq_length())  # negative count in transformers 5
        return
    index = None
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        if index is None or index.device != layer.keys.device:
            index = torch.tensor(rows, device=layer.keys.device) + block_start
        layer.keys = torch.cat([layer.keys[:, :, :block_start], layer.keys[:, :, index]], dim=2)
        layer.values = torch.cat([layer.values[:, :, :block_start], layer.values[:, :, index]], dim=2)
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = new_length
