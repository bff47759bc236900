"""EAGLE-3 (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time
Test"): one draft decoder layer over the target's fused low, middle and high layer features.

- ``config.py``: ``Eagle3Config``, what a checkpoint is;
- ``layer.py``: the draft decoder layer (attention over ``[embedding; hidden]``, training-time-test attention);
- ``model.py``: ``Eagle3Draft`` (fc + layer + norm + draft-vocabulary projection; save / load / push);
- ``drafter.py``: ``Eagle3Drafter``, EAGLE-2 dynamic trees over the layer's own KV cache.

Training lives in ``hf_spec.training.methods.eagle3``.
"""

from .config import Eagle3Config, default_feature_layers
from .drafter import Eagle3Drafter
from .model import Eagle3Draft

__all__ = ["Eagle3Config", "Eagle3Draft", "Eagle3Drafter", "default_feature_layers"]
