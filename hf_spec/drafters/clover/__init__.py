"""Clover-2 (Xiao et al. 2024, "Clover-2: Accurate Inference for Regressive Lightweight Speculative Decoding"):
chained draft heads over the target's last hidden state, with a regressive connection to the drafted tokens,
an attention decoder over the prefix's target features and per-head augmenting blocks.

- ``config.py``: ``CloverConfig``, what a checkpoint is;
- ``blocks.py``: the regressive connection, the attention decoder and the augmenting block;
- ``model.py``: ``CloverHeads`` (the blocks + norm + draft-vocabulary projection; save / load / push);
- ``drafter.py``: ``CloverDrafter``, dynamic trees or chains over the target's prefix features.

Training lives in ``hf_spec.training.methods.clover``.
"""

from .config import CloverConfig
from .drafter import CloverDrafter
from .model import CloverHeads

__all__ = ["CloverConfig", "CloverDrafter", "CloverHeads"]
