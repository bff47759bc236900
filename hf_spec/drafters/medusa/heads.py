"""Medusa heads: ``K`` residual-block heads on the target's last hidden state (Cai et al. 2024, "Medusa: Simple
LLM Inference Acceleration Framework with Multiple Decoding Heads").

Head ``k`` (``k = 0..K-1``) reads the target's last-layer hidden state ``h_t`` at the position of the last
committed token ``x_t`` and predicts ``x_{t+2+k}``: the draft token at depth ``k + 1`` below the root. Each
head is ``n`` residual blocks ``x + SiLU(W x + b)`` (``W``, ``b`` zero-initialised, so an untrained head starts
as the target's own next-token head) followed by a vocabulary projection, either the target's frozen
``lm_head`` (shared; checkpoints then hold only the residual blocks and stay a few MB) or a copy of it
trained with the head.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import UnsupportedError
from .config import MedusaConfig
from .persistence import SavedHeads

logger = logging.getLogger(__name__)


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)`` with ``W`` and ``b`` zero-initialised: the identity at initialisation."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    """One head: ``num_layers`` residual blocks, then (unless shared) its own vocabulary projection."""

    def __init__(self, hidden_size: int, vocab_size: int, num_layers: int, own_projection: bool):
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers)))
        self.projection = nn.Linear(hidden_size, vocab_size, bias=False) if own_projection else None

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        features = self.blocks(hidden)
        if self.projection is not None:
            return self.projection(features)
        if lm_head is None:
            raise ValueError("These Medusa heads share the target's lm_head: pass lm_head=target.get_output_embeddings().")
        return lm_head(features)


class MedusaHeads(SavedHeads, nn.Module):
    """The ``K`` Medusa heads, with ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (``SavedHeads``)."""

    config_class = MedusaConfig
    method_name = "medusa"

    def __init__(self, config: MedusaConfig):
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(
            MedusaHead(config.hidden_size, config.vocab_size, config.num_layers, not config.share_lm_head)
            for _ in range(config.num_heads)
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_target(cls, target, num_heads: int = 4, num_layers: int = 1, share_lm_head: bool = True,
                   **config_kwargs) -> MedusaHeads:
        """Fresh heads shaped for ``target``; own projections start as copies of its ``lm_head``."""
        vocab_size, hidden_size = target_head_shape(target)
        text_config = target.config.get_text_config()
        config_kwargs.setdefault("base_model", getattr(target.config, "_name_or_path", None) or None)
        config = MedusaConfig(hidden_size=hidden_size, vocab_size=vocab_size, num_heads=num_heads,
                              num_layers=num_layers, share_lm_head=share_lm_head,
                              logit_softcapping=getattr(text_config, "final_logit_softcapping", None), **config_kwargs)
        heads = cls(config)
        lm_head_weight = target.get_output_embeddings().weight
        heads.to(device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        if not share_lm_head:
            with torch.no_grad():
                for head in heads.heads:
                    head.projection.weight.copy_(lm_head_weight)
        return heads

    # ------------------------------------------------------------------ forward
    def head_logits(self, index: int, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """Logits of head ``index`` for hidden states ``(..., hidden_size)``."""
        logits = self.heads[index](hidden, lm_head)
        cap = self.config.logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """``(K, ..., vocab)`` logits of every head for hidden states ``(..., hidden_size)``."""
        return torch.stack([self.head_logits(index, hidden, lm_head) for index in range(len(self.heads))])

    # ------------------------------------------------------------------ checks
    def check_compatible(self, target, note_base_model: bool = True) -> None:
        """Raise ``UnsupportedError`` naming the mismatch if these heads cannot run on ``target``."""
        vocab_size, hidden_size = target_head_shape(target)
        problems = []
        if hidden_size != self.config.hidden_size:
            problems.append(f"hidden size {self.config.hidden_size} (target: {hidden_size})")
        if vocab_size != self.config.vocab_size:
            problems.append(f"vocabulary {self.config.vocab_size} (target's lm_head: {vocab_size})")
        if problems:
            raise UnsupportedError(
                f"These Medusa heads were trained for another model ({self.config.base_model or 'unknown base'}): "
                f"{'; '.join(problems)}. Load heads trained for this target, or train them with "
                "recipes/train_medusa.py."
            )
        base = self.config.base_model
        name = getattr(target.config, "_name_or_path", None)
        if note_base_model and base and name and Path(str(base)).name != Path(str(name)).name:
            logger.info("Medusa heads were trained for %s, the target is %s; shapes match.", base, name)


def target_head_shape(target) -> tuple[int, int]:
    """``(vocab rows, hidden size)`` of the target's output embedding."""
    output = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None
    if output is None or not hasattr(output, "weight"):
        raise UnsupportedError(f"{type(target).__name__} has no output embedding (lm_head); Medusa needs a causal LM.")
    shape = tuple(output.weight.shape)
    if len(shape) != 2 or 0 in shape:
        text_config = target.config.get_text_config()
        return text_config.vocab_size, text_config.hidden_size
    return shape[0], shape[1]
