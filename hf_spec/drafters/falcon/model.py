"""``FalconDraft``: the Falcon semi-autoregressive drafter (Gao et al. 2024), its weights and one drafter pass.

A row pairs the feature of position ``p`` (the target's last hidden state after its final norm at verified rows;
the drafter's own output at drafted ones) with the embedding of the token at ``p + 1``, at position ``p``. Rows run
through the LSTM and the decoder layer with the relaxed causal mask in blocks of ``k``; the output of row ``p``
regresses the feature of position ``p + k`` and, through the output projection, scores the token at ``p + k + 1``.
So the last block of ``k`` verified rows drafts the next ``k`` tokens at once, and feeding its outputs back (with
the drafted tokens) as the next block drafts ``k`` more: ``num_passes`` passes draft ``k * num_passes`` tokens.

The output projection starts as the target's ``lm_head`` rows (of the draft vocabulary) and stays frozen in training,
as the paper keeps the target's head; token embeddings are the target's (frozen, not stored).
"""

from __future__ import annotations

import torch
from torch import nn

from ..draft_vocab import DraftVocabulary
from ..eagle3.layer import RMSNorm
from ..eagle3.model import _rope_theta
from ..persistence import SavedHeads, check_draft_vocab, check_target, target_head_shape
from .config import FalconConfig
from .layer import Recurrence, RelaxedDecoderLayer


class FalconDraft(SavedHeads, nn.Module):
    """The semi-autoregressive head with ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``."""

    config_class = FalconConfig
    method_name = "falcon"

    def __init__(self, config: FalconConfig, draft_vocab: DraftVocabulary | None = None):
        super().__init__()
        check_draft_vocab(config, draft_vocab, "Falcon drafter")
        self.config = config
        self.draft_vocab = draft_vocab
        self.embedding_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feature_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lstm = Recurrence(2 * config.hidden_size, config.hidden_size)
        self.layer = RelaxedDecoderLayer(config)
        output_size = draft_vocab.size if draft_vocab is not None else config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, output_size, bias=False)

    @classmethod
    def for_target(cls, target, block_size: int = 2, num_passes: int = 3, draft_vocab: DraftVocabulary | None = None,
                   **config_kwargs) -> FalconDraft:
        """A fresh drafter shaped like one of ``target``'s decoder layers; its output projection is the target's
        ``lm_head`` rows (of the draft vocabulary)."""
        text = target.config.get_text_config()
        vocab_size, hidden_size = target_head_shape(target)
        config_kwargs.setdefault("base_model", getattr(target.config, "_name_or_path", None) or None)
        config = FalconConfig(
            hidden_size=hidden_size, vocab_size=vocab_size, num_target_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or hidden_size // text.num_attention_heads,
            intermediate_size=text.intermediate_size, block_size=block_size, num_passes=num_passes,
            rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)), rope_theta=float(_rope_theta(text)),
            logit_softcapping=getattr(text, "final_logit_softcapping", None),
            draft_vocab_size=draft_vocab.size if draft_vocab is not None else None, **config_kwargs)
        draft = cls(config, draft_vocab)
        weight = target.get_output_embeddings().weight
        draft.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            draft.lm_head.weight.copy_(draft_vocab.trim_output_rows(weight) if draft_vocab is not None else weight)
        return draft

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything but the output projection (the target's head, kept frozen)."""
        return [parameter for name, parameter in self.named_parameters() if not name.startswith("lm_head.")]

    # ------------------------------------------------------------------ pieces of a pass
    def lstm_inputs(self, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embedding_norm(embeddings), self.feature_norm(features.to(embeddings.dtype))], dim=-1)

    def recur(self, embeddings: torch.Tensor, features: torch.Tensor, state=None):
        """LSTM over rows ``(B, R, H)`` of token embeddings and features from ``state`` ``(h, c)`` (zeros when None):
        per-row outputs and the state after the last row."""
        return self.lstm(self.lstm_inputs(embeddings, features), state)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """Draft logits (draft ids when the drafter has a draft vocabulary) of the layer's outputs."""
        logits = self.lm_head(outputs)
        cap = self.config.logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits indexed by target ids (``-inf`` outside a draft vocabulary)."""
        return logits if self.draft_vocab is None else self.draft_vocab.to_target_logits(logits)

    def empty_cache(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        shape = (1, config.num_key_value_heads, 0, config.head_dim)
        dtype = self.lm_head.weight.dtype
        return torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype)

    # ------------------------------------------------------------------ checks
    def check_compatible(self, target, note_base_model: bool = True) -> None:
        """``UnsupportedError`` naming every mismatch between this drafter and ``target``."""
        check_target(self.config, target, "Falcon drafter", "recipes/train.py --config configs/falcon/<model>.yaml",
                     note_base_model)
