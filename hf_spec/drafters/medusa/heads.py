"""Medusa heads: ``K`` residual-block heads on the target's last hidden state (Cai et al. 2024, "Medusa: Simple
LLM Inference Acceleration Framework with Multiple Decoding Heads").

Head ``k`` (``k = 0..K-1``) reads the target's last-layer hidden state ``h_t`` at the position of the last
committed token ``x_t`` and predicts ``x_{t+2+k}``: the draft token at depth ``k + 1`` below the root. Each
head is ``n`` residual blocks ``x + SiLU(W x + b)`` (``W``, ``b`` zero-initialised, so an untrained head starts
as the target's own next-token head) followed by a vocabulary projection, either the target's frozen
``lm_head`` (shared; checkpoints then hold only the residual blocks and stay a few MB) or a copy of it
trained with the head.

With a draft vocabulary (``DraftVocabulary``: VocabTrim, Goel et al. 2025; FR-Spec, Zhao et al. 2025; EAGLE-3's
``d2t``, Li et al. 2025) the heads score only its ``N`` target tokens: a shared head multiplies by the ``N``
kept rows of the target's ``lm_head`` (``SharedRows``), an own projection has ``N`` rows. Head logits are
then indexed by draft ids; ``to_target_logits`` puts them back in target-id space with ``-inf`` (zero
probability) outside the subset, which is all verification needs to stay exact.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...cpu_fast_path import PackedLinear
from ...errors import UnsupportedError
from ..draft_vocab import DraftVocabulary
from ..persistence import SavedHeads, check_draft_vocab, check_target, target_head_shape
from .config import MedusaConfig


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
    """One head: ``num_layers`` residual blocks, then (unless shared) its own projection onto ``output_size``
    tokens (the target's vocabulary, or a draft vocabulary)."""

    def __init__(self, hidden_size: int, output_size: int, num_layers: int, own_projection: bool):
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers)))
        self.projection = nn.Linear(hidden_size, output_size, bias=False) if own_projection else None

    def forward(self, hidden: torch.Tensor, lm_head=None) -> torch.Tensor:
        """``lm_head``: the shared projection (the target's ``lm_head``, or a callable scoring a draft vocabulary)."""
        features = self.blocks(hidden)
        if self.projection is not None:
            return self.projection(features)
        if lm_head is None:
            raise ValueError("These Medusa heads share the target's lm_head: pass lm_head=target.get_output_embeddings().")
        return lm_head(features)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_dense() if tensor.is_mkldnn else tensor


class SharedRows:
    """The target's ``lm_head`` restricted to a draft vocabulary: ``N`` logits (draft ids) per hidden state.

    The ``N`` kept rows are gathered once and reused until the weight changes (another tensor, or an in-place
    update, which bumps the tensor's version counter): gathering 8192 of SmolLM2's 49152 rows costs about four
    times the trimmed product itself (14 ms against 3.3 ms for one hidden state, one CPU thread), and the cache
    costs ``N x hidden`` extra values. It holds a detached alias of the source weight, so that memory cannot be
    reused by another tensor while the cached rows are in use; rows gathered under ``torch.inference_mode`` are
    gathered again outside it (autograd cannot save inference tensors). A weight being trained
    (``requires_grad`` under autograd) is gathered on every call, so gradients reach it. Under DeepSpeed ZeRO-3
    the weight exists only inside ``lm_head``'s own forward; there the full logits are computed and the kept
    columns selected (same values, no saving).
    """

    def __init__(self, vocabulary: DraftVocabulary):
        self.vocabulary = vocabulary
        self._source: torch.Tensor | None = None
        self._version = -1
        self._rows: torch.Tensor | None = None

    def __call__(self, lm_head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        if not isinstance(lm_head, (nn.Linear, PackedLinear)):
            raise UnsupportedError(f"A draft vocabulary needs the target's lm_head to be a linear layer, got "
                                   f"{type(lm_head).__name__} (e.g. LoRA on lm_head: merge it first).")
        if hasattr(lm_head.weight, "ds_id"):  # a ZeRO-3 partitioned parameter
            return lm_head(features)[..., self.vocabulary.draft_to_target_on(features.device)]
        bias = None if lm_head.bias is None else self.vocabulary.trim_output_rows(_dense(lm_head.bias))
        return F.linear(features, self.rows(lm_head.weight), bias)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept rows of ``weight`` (``(N, hidden)``), from the cache while ``weight`` is unchanged."""
        if weight.requires_grad and torch.is_grad_enabled():
            return self.vocabulary.trim_output_rows(weight)
        if weight.is_mkldnn:  # packed by hf_spec.accelerate_for_cpu: no storage to compare, and it never changes
            if self._source is not weight:
                self._rows, self._source = self.vocabulary.trim_output_rows(weight.to_dense()), weight
            return self._rows
        source = self._source
        if (source is None or source.is_mkldnn or source.device != weight.device
                or source.data_ptr() != weight.data_ptr() or source.dtype != weight.dtype
                or source.shape != weight.shape or self._version != weight._version
                or (self._rows.is_inference() and not torch.is_inference_mode_enabled())):
            self._rows = self.vocabulary.trim_output_rows(weight.detach())
            self._source, self._version = weight.detach(), weight._version
        return self._rows


class MedusaHeads(SavedHeads, nn.Module):
    """The ``K`` Medusa heads, with ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (``SavedHeads``)."""

    config_class = MedusaConfig
    method_name = "medusa"

    def __init__(self, config: MedusaConfig, draft_vocab: DraftVocabulary | None = None):
        super().__init__()
        check_draft_vocab(config, draft_vocab, "Medusa heads")
        self.config = config
        self.draft_vocab = draft_vocab
        self._shared_rows = SharedRows(draft_vocab) if draft_vocab is not None else None
        output_size = draft_vocab.size if draft_vocab is not None else config.vocab_size
        self.heads = nn.ModuleList(
            MedusaHead(config.hidden_size, output_size, config.num_layers, not config.share_lm_head)
            for _ in range(config.num_heads)
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_target(cls, target, num_heads: int = 4, num_layers: int = 1, share_lm_head: bool = True,
                   draft_vocab: DraftVocabulary | None = None, **config_kwargs) -> MedusaHeads:
        """Fresh heads shaped for ``target``; own projections start as copies of its ``lm_head`` (of the draft
        vocabulary's rows, with ``draft_vocab``)."""
        vocab_size, hidden_size = target_head_shape(target)
        text_config = target.config.get_text_config()
        config_kwargs.setdefault("base_model", getattr(target.config, "_name_or_path", None) or None)
        config = MedusaConfig(hidden_size=hidden_size, vocab_size=vocab_size, num_heads=num_heads,
                              num_layers=num_layers, share_lm_head=share_lm_head,
                              logit_softcapping=getattr(text_config, "final_logit_softcapping", None),
                              draft_vocab_size=draft_vocab.size if draft_vocab is not None else None, **config_kwargs)
        heads = cls(config, draft_vocab)
        lm_head_weight = target.get_output_embeddings().weight
        heads.to(device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        if not share_lm_head:
            with torch.no_grad():
                rows = draft_vocab.trim_output_rows(lm_head_weight) if draft_vocab is not None else lm_head_weight
                for head in heads.heads:
                    head.projection.weight.copy_(rows)
        return heads

    # ------------------------------------------------------------------ forward
    def head_logits(self, index: int, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """Logits of head ``index`` for hidden states ``(..., hidden_size)``: over the target's vocabulary, or
        over the draft vocabulary (indexed by draft ids) when the heads have one."""
        logits = self.heads[index](hidden, self._shared_projection(lm_head))
        cap = self.config.logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """``(K, ..., output)`` logits of every head for hidden states ``(..., hidden_size)``."""
        return torch.stack([self.head_logits(index, hidden, lm_head) for index in range(len(self.heads))])

    def to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits indexed by target ids: with a draft vocabulary, scattered into the target's vocabulary with
        ``-inf`` outside it (``DraftVocabulary.to_target_logits``); otherwise ``logits`` unchanged."""
        return logits if self.draft_vocab is None else self.draft_vocab.to_target_logits(logits)

    def _shared_projection(self, lm_head: nn.Module | None):
        if lm_head is None or self._shared_rows is None:
            return lm_head
        return lambda features: self._shared_rows(lm_head, features)

    # ------------------------------------------------------------------ persistence of the draft vocabulary
    # ------------------------------------------------------------------ checks
    def check_compatible(self, target, note_base_model: bool = True) -> None:
        """Raise ``UnsupportedError`` naming the mismatch if these heads cannot run on ``target``."""
        check_target(self.config, target, "Medusa heads", "recipes/train.py --config configs/medusa/<model>.yaml",
                     note_base_model)
