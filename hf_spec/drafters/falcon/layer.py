"""The two layers of Falcon's semi-autoregressive head (Gao et al. 2024, "Falcon: Faster and Parallel Inference of
Large Language Models through Enhanced Semi-Autoregressive Drafting and Custom-Designed Decoding Tree"): an LSTM
over ``[norm(token embedding); norm(feature)]`` rows, then a pre-norm decoder layer whose attention is causal
between blocks of ``k`` rows and full inside a block (the *relaxed causal mask*), so one pass emits ``k`` tokens.

A tree node's pass continues the LSTM from its ancestor's block, and a second training pass from the state after its
anchor: ``Recurrence.cells`` recovers the cell state after every row of a ``torch.nn.LSTM`` run (which returns only
the last one) without stepping the LSTM in Python.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..clover.blocks import GroupedQueryProjections, merge_heads
from ..eagle3.layer import DraftMLP, RMSNorm


class Recurrence(nn.Module):
    """A one-layer LSTM over rows: ``forward(inputs (B, R, I), (h, c) or None) -> (hidden (B, R, H), (h, c))``."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        initial = None if state is None else (state[0][None].contiguous(), state[1][None].contiguous())
        hidden, (h, c) = self.lstm(inputs, initial)
        return hidden, (h[0], c[0])

    @torch.no_grad()
    def cells(self, inputs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The cell state after every row of a run from the zero state that returned ``hidden``.

        With every ``h`` known, one LSTM step per row from ``(h_{t-1}, c=0)`` gives ``i_t g_t`` and from
        ``(h_{t-1}, c=1)`` gives ``f_t + i_t g_t``: two batched one-step calls of the module (so a sharded
        optimizer such as ZeRO-3 gathers its weights as for any forward); only ``c_t = f_t c_{t-1} + i_t g_t``
        is sequential."""
        batch, rows, size = hidden.shape
        previous = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1).reshape(1, batch * rows, size)
        steps = inputs.reshape(batch * rows, 1, -1)
        _, (_, added) = self.lstm(steps, (previous, torch.zeros_like(previous)))
        _, (_, forget_plus_added) = self.lstm(steps, (previous, torch.ones_like(previous)))
        added = added.reshape(batch, rows, size)
        forget = forget_plus_added.reshape(batch, rows, size) - added
        cells = torch.empty_like(hidden)
        c = torch.zeros_like(hidden[:, 0])
        for row in range(rows):
            c = forget[:, row] * c + added[:, row]
            cells[:, row] = c
        return cells


class RelaxedDecoderLayer(nn.Module):
    """``x + attn(norm(x))``, then ``+ mlp(norm(.))``; the caller masks the attention (``attend``) or scores a query
    against two key sets (``attend_split``: training's second pass, prefix keys plus its own block's)."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GroupedQueryProjections(config, bias=False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DraftMLP(config.hidden_size, config.intermediate_size)

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """Rotated queries ``(B, heads, R, d)`` and keys, values ``(B, kv_heads, R, d)`` of rows ``x`` at positions."""
        normed = self.input_layernorm(x)
        keys, values = self.self_attn.keys_values(normed, positions)
        return self.self_attn.query(normed, positions), keys, values

    def attend(self, q, keys, values, allowed: torch.Tensor) -> torch.Tensor:
        """Attention output of ``q`` where ``allowed`` ``(R, keys)`` (or ``(B, 1, R, keys)``) is True."""
        attn = self.self_attn
        mask = allowed if allowed.dim() == 4 else allowed[None, None]
        return attn.o_proj(merge_heads(F.scaled_dot_product_attention(q, attn.expand(keys), attn.expand(values),
                                                                      attn_mask=mask)))

    def attend_split(self, q, prefix_keys, prefix_values, prefix_allowed, own_keys, own_values,
                     own_allowed) -> torch.Tensor:
        """Row ``r`` attends to ``prefix_*`` where ``prefix_allowed[r]`` ``(R, P)`` and to the rows
        ``own_keys[:, :, r, j]`` (``(B, kv_heads, R, k, d)``: its block's rows) where ``own_allowed[r, j]``."""
        attn = self.self_attn
        scale = attn.head_dim ** -0.5
        prefix_scores = (q @ attn.expand(prefix_keys).transpose(-1, -2)) * scale
        prefix_scores = prefix_scores.masked_fill(~prefix_allowed[None, None], float("-inf"))
        own_keys, own_values = attn.expand(own_keys), attn.expand(own_values)
        own_scores = (q[..., None, :] * own_keys).sum(-1) * scale
        own_scores = own_scores.masked_fill(~own_allowed[None, None], float("-inf"))
        weights = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1).float(), dim=-1).to(q.dtype)
        prefix_weights, own_weights = weights.split([prefix_scores.shape[-1], own_scores.shape[-1]], dim=-1)
        out = prefix_weights @ attn.expand(prefix_values) + (own_weights[..., None] * own_values).sum(-2)
        return attn.o_proj(merge_heads(out))

    def finish(self, x: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        x = x + attention_output
        return x + self.mlp(self.post_attention_layernorm(x))


def relaxed_causal_mask(rows: int, block_size: int, device=None) -> torch.Tensor:
    """``(rows, rows)``: row ``i`` sees row ``j`` when ``j``'s block (``j // k``) is not after ``i``'s."""
    blocks = torch.arange(rows, device=device) // block_size
    return blocks[None, :] <= blocks[:, None]
