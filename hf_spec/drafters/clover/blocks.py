"""The three blocks of Clover-2 (Xiao et al. 2024, "Clover-2: Accurate Inference for Regressive Lightweight
Speculative Decoding"), written for any batch of query rows so that training (every anchor of a sequence at
once) and tree drafting (the frontier of a tree) run the same code.

- ``RegressiveConnection``: the head's state attends to the embeddings of the tokens drafted so far on its
  path (the root token first): what the previous heads speculated enters the next head's prediction.
- ``AttentionDecoder``: a decoder layer (initialised from the target's last one) whose query is the head's
  state and whose keys and values are the target's features of the verified prefix, plus the state itself.
- ``AugmentingBlock``: per head, a residual linear layer before the shared norm and output projection
  (zero-initialised: an untrained head reads its state as the target's lm_head would).

Rotary positions: a row for the token at position ``p`` sits at ``p``; prefix features at their own positions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..eagle3.layer import DraftMLP, RMSNorm, rotate


def _heads(x: torch.Tensor, count: int, size: int) -> torch.Tensor:
    """``(batch, rows, count * size)`` -> ``(batch, count, rows, size)``."""
    batch, rows, _ = x.shape
    return x.view(batch, rows, count, size).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, count, rows, size = x.shape
    return x.transpose(1, 2).reshape(batch, rows, count * size)


class GroupedQueryProjections(nn.Module):
    """Query, key, value and output projections of grouped-query attention with rotary positions."""

    def __init__(self, config, bias: bool):
        super().__init__()
        size = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.q_proj = nn.Linear(size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, size, bias=False)

    def query(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotate(_heads(self.q_proj(x), self.heads, self.head_dim), positions, self.theta)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = rotate(_heads(self.k_proj(x), self.kv_heads, self.head_dim), positions, self.theta)
        return keys, _heads(self.v_proj(x), self.kv_heads, self.head_dim)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.heads // self.kv_heads, dim=1)


class RegressiveConnection(nn.Module):
    """``s + attn(norm(s) -> norm(embeddings of the path's tokens))``."""

    def __init__(self, config):
        super().__init__()
        self.state_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.token_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = GroupedQueryProjections(config, bias=False)

    def token_keys(self, embeddings: torch.Tensor, positions: torch.Tensor):
        """Keys and values of token embeddings ``(batch, tokens, H)`` at ``positions`` ``(batch, tokens)``."""
        return self.attn.keys_values(self.token_norm(embeddings), positions)

    def forward(self, state, positions, keys, values, allowed) -> torch.Tensor:
        """``state`` ``(batch, rows, H)`` at ``positions``; row ``r`` reads the token keys where ``allowed[r]``."""
        attn = self.attn
        q = attn.query(self.state_norm(state), positions)
        mask = allowed if allowed.dim() == 4 else allowed[None, None]
        out = F.scaled_dot_product_attention(q, attn.expand(keys), attn.expand(values), attn_mask=mask)
        return state + attn.o_proj(merge_heads(out))


class AttentionDecoder(nn.Module):
    """A pre-norm decoder layer: rows attend to the target's prefix features (where allowed) and to themselves."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GroupedQueryProjections(config, bias=config.attention_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DraftMLP(config.hidden_size, config.intermediate_size)

    def prefix_keys(self, features: torch.Tensor, positions: torch.Tensor):
        """Keys and values of the target's features ``(batch, rows, H)`` at ``positions``."""
        return self.self_attn.keys_values(self.input_layernorm(features), positions)

    def forward(self, state, positions, prefix_keys, prefix_values, prefix_allowed) -> torch.Tensor:
        attn = self.self_attn
        normed = self.input_layernorm(state)
        q = attn.query(normed, positions)
        own_keys, own_values = attn.keys_values(normed, positions)
        scale = attn.head_dim ** -0.5
        prefix_scores = (q @ attn.expand(prefix_keys).transpose(-1, -2)) * scale
        mask = prefix_allowed if prefix_allowed.dim() == 4 else prefix_allowed[None, None]
        prefix_scores = prefix_scores.masked_fill(~mask, float("-inf"))
        own_scores = (q * attn.expand(own_keys)).sum(-1, keepdim=True) * scale
        weights = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1).float(), dim=-1).to(q.dtype)
        out = weights[..., :-1] @ attn.expand(prefix_values) + weights[..., -1:] * attn.expand(own_values)
        state = state + attn.o_proj(merge_heads(out))
        return state + self.mlp(self.post_attention_layernorm(state))


class AugmentingBlock(nn.Module):
    """``x + W x`` with ``W`` starting at zero."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)
