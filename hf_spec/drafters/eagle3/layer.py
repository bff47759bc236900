"""The EAGLE-3 draft decoder layer: one Llama-style layer whose attention reads ``[norm(embedding); norm(hidden)]``.

Li et al. 2025 ("EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test"):
the draft's input at a position is the embedding of the token there together with a hidden state: the fused
target features (``fc`` of a low, a middle and a high layer) at positions the target has verified, the draft's
own output at positions it drafted. Queries, keys and values are projected from the concatenation (width
``2H``); the residual stream is the hidden state. Rotary embeddings use the target's positions and base.

The attention is written out here (not a transformers decoder layer) because its input width differs from its
output width, and because training-time test needs one attention pattern no causal LM forward expresses:
``attend_unrolled`` lets a query at drafting step ``j`` see the verified prefix and the same anchor's rows of
steps ``1..j``, exactly the keys it sees when drafting.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(batch, heads, rows, head_dim)`` at ``positions`` ``(batch, rows)``."""
    half = x.shape[-1] // 2
    inverse = 1.0 / theta ** (torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None, :, None] * inverse
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class DraftAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = 2 * config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """Rotated queries ``(batch, heads, rows, d)``, keys and values ``(batch, kv_heads, rows, d)``."""
        batch, rows, _ = x.shape
        q = self.q_proj(x).view(batch, rows, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, rows, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, rows, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotate(q, positions, self.theta), rotate(k, positions, self.theta), v

    def attend(self, q, keys, values, allowed: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` over ``keys`` / ``values`` where ``allowed`` ``(rows, keys)`` (or batched) is True."""
        group = self.heads // self.kv_heads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        mask = allowed if allowed.dim() == 4 else allowed[None, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.output(out)

    def attend_unrolled(self, q, prefix_keys, prefix_values, own_keys: list, own_values: list,
                        prefix_allowed: torch.Tensor) -> torch.Tensor:
        """Training-time test: row ``t`` attends to ``prefix_*`` where ``prefix_allowed[t]`` (the verified prefix
        up to its anchor) and to row ``t`` of each of ``own_keys`` / ``own_values`` (its own earlier steps and
        itself). Keys are ``(batch, kv_heads, rows, d)``; the diagonal part costs one dot product per row."""
        group = self.heads // self.kv_heads
        expand = lambda tensor: tensor.repeat_interleave(group, dim=1)  # noqa: E731
        scale = self.head_dim ** -0.5
        prefix_scores = (q @ expand(prefix_keys).transpose(-1, -2)) * scale
        mask = prefix_allowed if prefix_allowed.dim() == 4 else prefix_allowed[None, None]
        prefix_scores = prefix_scores.masked_fill(~mask, float("-inf"))
        own_scores = torch.stack([(q * expand(keys)).sum(-1) * scale for keys in own_keys], dim=-1)
        weights = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1).float(), dim=-1).to(q.dtype)
        prefix_weights, own_weights = weights.split([prefix_scores.shape[-1], len(own_keys)], dim=-1)
        out = prefix_weights @ expand(prefix_values)
        for index, values in enumerate(own_values):
            out = out + own_weights[..., index : index + 1] * expand(values)
        return self.output(out)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, rows, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, rows, self.heads * self.head_dim))


class DraftMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """``h' = h + attn([norm(e); norm(h)])``, then ``h' + mlp(norm(h'))``. The two halves of a forward are
    exposed (``attention_input`` / ``finish``) so callers choose how the attention itself is masked."""

    def __init__(self, config):
        super().__init__()
        self.embedding_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DraftAttention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DraftMLP(config.hidden_size, config.intermediate_size)

    def attention_input(self, embeddings: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embedding_norm(embeddings), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        hidden = hidden + attention_output
        return hidden + self.mlp(self.post_attention_norm(hidden))
