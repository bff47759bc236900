"""``CloverHeads``: the Clover-2 draft heads (Xiao et al. 2024), their weights and one head step.

Head ``i`` turns a state into the next: ``v = AttentionDecoder(RegressiveConnection(s, path tokens), prefix)``,
and scores the token two plus ``i`` positions after the anchor with ``lm_head(norm(Augment_i(v)))``. The first
state is the target's last hidden state before its final norm at the anchor; each later one is the previous
head's ``v`` (the heads are chained like an RNN, and ``v`` is trained to regress the target's next feature).
The regressive connection and the attention decoder are shared by all heads; each head has its own augmenting
block. The decoder starts as a copy of the target's last decoder layer, the norm as the target's final norm,
the output projection as the target's ``lm_head`` rows (of the draft vocabulary). Token embeddings are the
target's (frozen, not stored).
"""

from __future__ import annotations

import torch
from torch import nn

from ...engine.features import decoder_parts
from ..draft_vocab import DraftVocabulary
from ..eagle3.layer import RMSNorm
from ..eagle3.model import _rope_theta
from ..persistence import SavedHeads, check_draft_vocab, check_target, target_head_shape
from .blocks import AttentionDecoder, AugmentingBlock, RegressiveConnection
from .config import CloverConfig

# parameters of the target's last decoder layer that the attention decoder starts from (when the shapes match)
DECODER_INIT = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                "mlp.up_proj.weight", "mlp.down_proj.weight")
DECODER_NORMS = ("input_layernorm", "post_attention_layernorm")


class CloverHeads(SavedHeads, nn.Module):
    """Clover-2 heads with ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``."""

    config_class = CloverConfig
    method_name = "clover"

    def __init__(self, config: CloverConfig, draft_vocab: DraftVocabulary | None = None):
        super().__init__()
        check_draft_vocab(config, draft_vocab, "Clover-2 heads")
        self.config = config
        self.draft_vocab = draft_vocab
        self.regressive = RegressiveConnection(config)
        self.decoder = AttentionDecoder(config)
        self.augment = nn.ModuleList(AugmentingBlock(config.hidden_size) for _ in range(config.num_heads))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        output_size = draft_vocab.size if draft_vocab is not None else config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, output_size, bias=False)

    @classmethod
    def for_target(cls, target, num_heads: int = 5, draft_vocab: DraftVocabulary | None = None,
                   **config_kwargs) -> CloverHeads:
        """Fresh heads for ``target``: the decoder copies its last decoder layer where the shapes match (Llama- and
        Qwen2-style layers entirely), the norm its final norm, the output projection its ``lm_head`` rows."""
        text = target.config.get_text_config()
        vocab_size, hidden_size = target_head_shape(target)
        config_kwargs.setdefault("base_model", getattr(target.config, "_name_or_path", None) or None)
        config = CloverConfig(
            hidden_size=hidden_size, vocab_size=vocab_size, num_target_layers=text.num_hidden_layers,
            num_heads=num_heads, num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or hidden_size // text.num_attention_heads,
            intermediate_size=text.intermediate_size, attention_bias=bool(getattr(text, "attention_bias", False)
                                                                         or text.model_type == "qwen2"),
            rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)), rope_theta=float(_rope_theta(text)),
            logit_softcapping=getattr(text, "final_logit_softcapping", None),
            draft_vocab_size=draft_vocab.size if draft_vocab is not None else None, **config_kwargs)
        heads = cls(config, draft_vocab)
        weight = target.get_output_embeddings().weight
        heads.to(device=weight.device, dtype=weight.dtype)
        _, layers, norm = decoder_parts(target)
        with torch.no_grad():
            source = dict(layers[-1].named_parameters())
            own = dict(heads.decoder.named_parameters())
            for name in DECODER_INIT:
                if name in source and name in own and source[name].shape == own[name].shape:
                    own[name].copy_(source[name])
            for name in DECODER_NORMS:
                if isinstance(getattr(layers[-1], name, None), nn.Module):
                    getattr(heads.decoder, name).weight.copy_(_norm_scale(getattr(layers[-1], name), hidden_size))
            if norm is not None:
                heads.norm.weight.copy_(_norm_scale(norm, hidden_size))
            heads.lm_head.weight.copy_(draft_vocab.trim_output_rows(weight) if draft_vocab is not None else weight)
        return heads

    # ------------------------------------------------------------------ one head
    def step(self, state, positions, token_keys, token_values, token_allowed, prefix_keys, prefix_values,
             prefix_allowed) -> torch.Tensor:
        """The next state of rows ``state`` ``(batch, rows, H)`` whose newest path token sits at ``positions``."""
        state = self.regressive(state, positions, token_keys, token_values, token_allowed)
        return self.decoder(state, positions, prefix_keys, prefix_values, prefix_allowed)

    def logits(self, head: int, state: torch.Tensor) -> torch.Tensor:
        """Head ``head``'s draft logits (draft ids when the heads have a draft vocabulary) of its states."""
        logits = self.lm_head(self.norm(self.augment[head](state)))
        cap = self.config.logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.draft_vocab is None else self.draft_vocab.to_target_logits(logits)

    # ------------------------------------------------------------------ checks
    def check_compatible(self, target, note_base_model: bool = True) -> None:
        """``UnsupportedError`` naming every mismatch between these heads and ``target``."""
        check_target(self.config, target, "Clover-2 heads", "recipes/train.py --config configs/clover/<model>.yaml",
                     note_base_model)


def _norm_scale(norm: nn.Module, size: int) -> torch.Tensor:
    """The per-channel scale an RMS norm applies, however it stores it (Llama: ``w``, Gemma: ``1 + w``): its output
    for an all-ones input, whose RMS is 1."""
    probe = torch.ones(1, size, device=norm.weight.device, dtype=norm.weight.dtype)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 0.0)
    return norm(probe)[0] * (1.0 + eps) ** 0.5
