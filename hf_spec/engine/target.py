"""The target side of a step: one forward over the whole draft tree, and its processed scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from ..errors import UnsupportedError
from .tree import DraftTree


@dataclass
class TreeForward:
    """Target outputs for every block row (row 0 = root, row i + 1 = node i)."""

    logits: torch.Tensor  # (n + 1, vocab), raw
    hidden_states: torch.Tensor | None  # (n + 1, hidden), last layer, when requested


def prefill(model, cache, input_ids: torch.Tensor, want_hidden: bool = False) -> torch.Tensor | None:
    """Fill the cache with every committed token except the last one (the next step's root).

    Returns the last-layer hidden state of the last prefilled position when ``want_hidden``.
    """
    start = cache.get_seq_length()
    if start >= input_ids.shape[1]:
        raise ValueError(f"The cache passed to generate() already holds {start} tokens, as many as the input.")
    pending = input_ids[:, start:-1]
    if pending.shape[1] == 0:
        return None
    outputs = model(input_ids=pending, past_key_values=cache, use_cache=True, logits_to_keep=1,
                    output_hidden_states=want_hidden)
    return outputs.hidden_states[-1][0, -1] if want_hidden else None


def forward_tree(model, cache, root_token: torch.Tensor, tree: DraftTree, want_hidden: bool = False) -> TreeForward:
    """Run the target once over the root and all draft nodes.

    Position ids are the root's position plus each node's depth; a chain uses the model's own
    causal mask, a branching tree a 4D additive mask that lets every node see the whole cached
    context and its own ancestors only (tree attention, SpecInfer-style), through the model's
    public ``forward``.
    """
    past_length = cache.get_seq_length()
    block_tokens = torch.cat([root_token.view(1), tree.tokens]).unsqueeze(0)
    positions = (past_length + tree.block_position_offsets()).unsqueeze(0)
    allowed = None
    if not tree.is_chain:
        ancestry = tree.block_ancestry()
        context = torch.ones(ancestry.shape[0], past_length, dtype=torch.bool, device=ancestry.device)
        allowed = torch.cat([context, ancestry], dim=1)
    outputs = forward_with_mask(model, cache, block_tokens, positions, allowed, want_hidden)
    hidden = outputs.hidden_states[-1][0] if want_hidden else None
    return TreeForward(logits=outputs.logits[0], hidden_states=hidden)


def forward_with_mask(model, cache, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None,
                      want_hidden: bool = False):
    """Run ``model`` on new ``tokens`` after ``cache``; ``allowed`` is the ``(new, cached + new)`` bool
    attention pattern, or ``None`` for the model's own causal mask. Goes through the public forward."""
    past_length = cache.get_seq_length()
    attention_mask = None
    if allowed is not None:
        if "flash" in str(model.config._attn_implementation):
            raise UnsupportedError(
                "Tree drafts need a 4D attention mask, which flash attention cannot take; load the model "
                "with attn_implementation='sdpa' (or 'eager'), or use a chain drafter."
            )
        attention_mask = torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device)
        attention_mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)
        attention_mask = attention_mask[None, None]
    return model(
        input_ids=tokens,
        position_ids=positions,
        cache_position=torch.arange(past_length, past_length + tokens.shape[1], device=tokens.device),
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=want_hidden,
    )


def process_block_scores(
    logits_processor: LogitsProcessorList,
    input_ids: torch.Tensor,
    tree: DraftTree,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Apply generate()'s logits processors to every block row, as plain decoding would.

    A processor sees the sequence that row continues: the committed ids plus the draft path to the
    row. Rows of equal depth have equal lengths and go through the processors as one batch.
    """
    logits = logits.float()
    if len(logits_processor) == 0:
        return logits
    scores = torch.empty_like(logits)
    rows_at_depth: dict[int, list[int]] = {}
    for row, path in enumerate(tree.paths):
        rows_at_depth.setdefault(len(path), []).append(row)
    for depth, rows in rows_at_depth.items():
        prefix = input_ids.expand(len(rows), -1)
        if depth:
            suffix = torch.tensor([tree.paths[row] for row in rows], dtype=input_ids.dtype, device=input_ids.device)
            prefix = torch.cat([prefix, suffix], dim=1)
        scores[rows] = logits_processor(prefix, logits[rows])
    return scores
