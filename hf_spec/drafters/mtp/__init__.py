"""Gated-LoRA multi-token prediction (Samragh et al. 2025, "Your LLM Knows the Future: Uncovering Its Multi-Token
Prediction Potential"): the base model itself drafts ``k`` future tokens from mask tokens, through a LoRA adapter
gated to the mask rows, so its next-token outputs stay exactly the base model's.

- ``gate.py``: ``GatedLoRALinear``, ``apply_gated_lora`` (why not peft's aLoRA: see its docstring);
- ``layout.py``: the masked-input training layout (extended sequence, position ids, attention pattern, labels);
- ``config.py``: ``MTPConfig``, what a checkpoint is;
- ``model.py``: ``MTPModel`` (base + gated LoRA + mask embeddings + sampler head; ``forward_layout``; save / load);
- ``drafter.py``: ``MTPDrafter``, self-speculative decoding through ``generate()`` (quadratic decoding).
"""

from .config import MTPConfig
from .drafter import MTPDrafter
from .gate import DEFAULT_TARGET_MODULES, GatedLoRALinear, LoRAGate, apply_gated_lora
from .layout import IGNORE_INDEX, MTPLayout, build_layout, every_anchor
from .model import MTPModel, MTPOutput

__all__ = ["DEFAULT_TARGET_MODULES", "IGNORE_INDEX", "GatedLoRALinear", "LoRAGate", "MTPConfig", "MTPDrafter",
           "MTPLayout", "MTPModel", "MTPOutput", "apply_gated_lora", "build_layout", "every_anchor"]
