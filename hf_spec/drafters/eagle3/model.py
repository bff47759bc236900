"""``Eagle3Draft``: the EAGLE-3 draft model (Li et al. 2025), its weights and how it runs one drafting step.

Parts: ``fc`` fuses the target's low, middle and high layer features (``3H -> H``); one ``DraftLayer``; a final
norm; an output projection onto the draft vocabulary (``N`` rows, initialised from the target's ``lm_head``
rows; EAGLE-3's ``d2t``). Token embeddings are the target's own (frozen, not stored): a checkpoint holds only
the draft layer (about 11M parameters for SmolLM2-135M with ``N = 8192``).

A row of the draft pairs a hidden state with the *next* token: the target's features at position ``t`` (which
predicted ``x_{t+1}``) with the embedding of ``x_{t+1}``, at position ``t``; its output predicts ``x_{t+2}`` and,
as the hidden state of the next row, drafts the token after that.
"""

from __future__ import annotations

import torch
from torch import nn

from ..draft_vocab import DraftVocabulary
from ..persistence import SavedHeads, check_draft_vocab, check_target, target_head_shape
from .config import Eagle3Config, default_feature_layers
from .layer import DraftLayer, RMSNorm


class Eagle3Draft(SavedHeads, nn.Module):
    """The draft layer with ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``."""

    config_class = Eagle3Config
    method_name = "eagle3"

    def __init__(self, config: Eagle3Config, draft_vocab: DraftVocabulary | None = None):
        super().__init__()
        check_draft_vocab(config, draft_vocab, "EAGLE-3 draft")
        self.config = config
        self.draft_vocab = draft_vocab
        self.fc = nn.Linear(config.feature_size, config.hidden_size, bias=False)
        self.layer = DraftLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        output_size = draft_vocab.size if draft_vocab is not None else config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, output_size, bias=False)

    @classmethod
    def for_target(cls, target, feature_layers: list[int] | None = None, draft_vocab: DraftVocabulary | None = None,
                   **config_kwargs) -> Eagle3Draft:
        """A fresh draft layer shaped like one of ``target``'s decoder layers; its output projection starts as the
        target's ``lm_head`` rows (of the draft vocabulary)."""
        text = target.config.get_text_config()
        vocab_size, hidden_size = target_head_shape(target)
        num_layers = text.num_hidden_layers
        config_kwargs.setdefault("base_model", getattr(target.config, "_name_or_path", None) or None)
        config = Eagle3Config(
            hidden_size=hidden_size, vocab_size=vocab_size, num_target_layers=num_layers,
            feature_layers=list(feature_layers if feature_layers is not None else default_feature_layers(num_layers)),
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or hidden_size // text.num_attention_heads,
            intermediate_size=text.intermediate_size, rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(text)), logit_softcapping=getattr(text, "final_logit_softcapping", None),
            draft_vocab_size=draft_vocab.size if draft_vocab is not None else None, **config_kwargs)
        draft = cls(config, draft_vocab)
        weight = target.get_output_embeddings().weight
        draft.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            draft.lm_head.weight.copy_(draft_vocab.trim_output_rows(weight) if draft_vocab is not None else weight)
        return draft

    # ------------------------------------------------------------------ pieces of a forward
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The hidden state of a verified row: ``fc`` of the target's concatenated feature layers."""
        return self.fc(features.to(self.fc.weight.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits (draft ids when the draft has a draft vocabulary) of the layer's outputs."""
        logits = self.lm_head(self.norm(hidden))
        cap = self.config.logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits indexed by target ids (``-inf`` outside a draft vocabulary)."""
        return logits if self.draft_vocab is None else self.draft_vocab.to_target_logits(logits)

    def step(self, embeddings, hidden, positions, past_keys, past_values, allowed):
        """Run the layer on new rows that attend to ``past_*`` ``(batch, kv_heads, past, d)`` and to each other
        where ``allowed`` ``(rows, past + rows)`` is True. Returns the outputs and the new rows' keys and values."""
        layer = self.layer
        q, k, v = layer.self_attn.project(layer.attention_input(embeddings, hidden), positions)
        keys, values = torch.cat([past_keys, k], dim=2), torch.cat([past_values, v], dim=2)
        return layer.finish(hidden, layer.self_attn.attend(q, keys, values, allowed)), k, v

    def empty_cache(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        shape = (1, config.num_key_value_heads, 0, config.head_dim)
        return (torch.empty(shape, device=device, dtype=self.fc.weight.dtype),
                torch.empty(shape, device=device, dtype=self.fc.weight.dtype))

    # ------------------------------------------------------------------ checks
    def check_compatible(self, target, note_base_model: bool = True) -> None:
        """``UnsupportedError`` naming every mismatch between this draft layer and ``target``."""
        check_target(self.config, target, "EAGLE-3 draft", "recipes/train.py --config configs/eagle3/<model>.yaml",
                     note_base_model)


def _rope_theta(text_config) -> float:
    """The target's rotary base (transformers 5 keeps it in ``rope_parameters``)."""
    parameters = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return parameters["rope_theta"]
    if isinstance(parameters, dict) and isinstance(parameters.get("full_attention"), dict):
        return parameters["full_attention"].get("rope_theta", 10000.0)
    return getattr(text_config, "rope_theta", 10000.0)
