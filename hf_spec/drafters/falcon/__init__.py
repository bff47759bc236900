"""Falcon (Gao et al. 2024, "Falcon: Faster and Parallel Inference of Large Language Models through Enhanced
Semi-Autoregressive Drafting and Custom-Designed Decoding Tree"): a semi-autoregressive drafter (an LSTM and a
decoder layer with a relaxed causal mask) that drafts ``k`` tokens per pass from the target's last hidden states.

- ``config.py``: ``FalconConfig``, what a checkpoint is;
- ``layer.py``: the LSTM recurrence, the relaxed decoder layer and its mask;
- ``model.py``: ``FalconDraft`` (the two layers + the frozen draft-vocabulary projection; save / load / push);
- ``drafter.py``: ``FalconDrafter``, trees grown pass by pass.

Training (Coupled Sequential Glancing Distillation) lives in ``hf_spec.training.methods.falcon``.
"""

from .config import FalconConfig
from .drafter import FalconDrafter
from .model import FalconDraft

__all__ = ["FalconConfig", "FalconDraft", "FalconDrafter"]
