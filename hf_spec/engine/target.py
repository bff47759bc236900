"""The target side of a step: one forward over the whole draft tree, and its processed scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from ..errors import UnsupportedError
from .appended_rows import AppendedRows
from .cache import recording_block
from .features import capture_features
from .tree import DraftTree


@dataclass
class TreeForward:
    """Target outputs for every block row (row 0 = root, row i + 1 = node i)."""

    logits: torch.Tensor  # (n + 1, vocab), raw
    features: torch.Tensor | None  # (1, n + 1, dim): the drafter's requested target features, or None


def prefill(model, cache, input_ids: torch.Tensor, features: tuple = ()) -> torch.Tensor | None:
    """Fill the cache with every committed token except the last one (the next step's root).

    Returns the ``features`` (resolved layer names, ``hf_spec.engine.features``) of the prefilled
    positions, ``(1, rows, dim)``, or ``None`` when none are asked for.
    """
    start = cache.get_seq_length()
    if start >= input_ids.shape[1]:
        raise ValueError(f"The cache passed to generate() already holds {start} tokens, as many as the input.")
    pending = input_ids[:, start:-1]
    if pending.shape[1] == 0:
        return None
    with capture_features(model, features) as store:
        model(input_ids=pending, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return store.features()


def forward_tree(model, cache, root_token: torch.Tensor, tree: DraftTree, features: tuple = (),
                 appended: AppendedRows | None = None) -> TreeForward:
    """Run the target once over the root and all draft nodes (and a drafter's ``appended`` rows after them).

    Position ids are the root's position plus each node's depth; a chain uses the model's own
    causal mask, a branching tree a 4D additive mask that lets every node see the whole cached
    context and its own ancestors only (tree attention, SpecInfer-style), through the model's
    public ``forward``. Appended rows (``hf_spec.engine.appended_rows``) get their own rows of that
    mask; no block row sees them and only the block rows' logits are computed.
    """
    past_length = cache.get_seq_length()
    block_tokens = torch.cat([root_token.view(1), tree.tokens]).unsqueeze(0)
    block_positions = past_length + tree.block_position_offsets()
    allowed = None
    if not tree.is_chain or appended is not None:
        ancestry = tree.block_ancestry()
        context = torch.ones(ancestry.shape[0], past_length, dtype=torch.bool, device=ancestry.device)
        allowed = torch.cat([context, ancestry], dim=1)
    if appended is None:
        with capture_features(model, features) as store:
            outputs = forward_with_mask(model, cache, block_tokens, block_positions.unsqueeze(0), allowed)
        return TreeForward(logits=outputs.logits[0], features=store.features())
    rows = block_tokens.shape[1]
    allowed = torch.cat([torch.nn.functional.pad(allowed, (0, appended.count)),
                         appended.attention(tree.block_ancestry(), past_length)])
    positions = torch.cat([block_positions, appended.positions(block_positions)]).unsqueeze(0)
    embeddings = model.get_input_embeddings()(block_tokens)
    embeddings = torch.cat([embeddings, appended.embeddings.to(embeddings.dtype).unsqueeze(0)], dim=1)
    with capture_features(model, features) as store, appended.context:
        outputs = forward_with_mask(model, cache, None, positions, allowed, inputs_embeds=embeddings,
                                    logits_rows=torch.arange(rows, device=block_tokens.device))
    captured = store.features()
    return TreeForward(logits=outputs.logits[0], features=None if captured is None else captured[:, :rows])


def forward_with_mask(model, cache, tokens: torch.Tensor | None, positions: torch.Tensor, allowed: torch.Tensor | None,
                      inputs_embeds: torch.Tensor | None = None, logits_rows: torch.Tensor | None = None):
    """Run ``model`` on new ``tokens`` (or their ``inputs_embeds``) after ``cache``; ``allowed`` is the
    ``(new, cached + new)`` bool attention pattern, or ``None`` for the model's own causal mask. Goes
    through the public forward. ``logits_rows``: the rows whose logits to compute (default: all).

    Each row of ``allowed`` must be that row's whole sequence (context, then its tree path, then
    itself) in order: sliding-window layers see only its last ``window`` entries. The new rows can
    be rolled back afterwards with ``keep_block_rows``.
    """
    past_length = cache.get_seq_length()
    new_rows = (tokens if tokens is not None else inputs_embeds).shape[1]
    device = positions.device
    attention_mask = None
    if allowed is not None:
        if "flash" in str(model.config._attn_implementation):
            raise UnsupportedError(
                "Tree drafts need a 4D attention mask, which flash attention cannot take; load the model "
                "with attn_implementation='sdpa' (or 'eager'), or use a chain drafter."
            )
        attention_mask = tree_attention_masks(model, cache, allowed)
    with recording_block(cache):
        return model(
            input_ids=tokens,
            inputs_embeds=inputs_embeds,
            position_ids=positions,
            cache_position=torch.arange(past_length, past_length + new_rows, device=device),
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            **({} if logits_rows is None else {"logits_to_keep": logits_rows}),
        )


def tree_attention_masks(model, cache, allowed: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The additive 4D mask(s) the model's forward takes for the attention pattern ``allowed``.

    A model whose layers all attend to the full context gets one ``(1, 1, new, cached + new)`` mask.
    A model with sliding-window layers (``config.layer_types``) gets one mask per layer type, as its
    forward accepts: the sliding one keeps of each row only its last ``sliding_window`` allowed keys
    (as plain decoding does: a query attends to the ``window`` most recent positions of its own
    sequence, itself included) and covers only the keys the sliding cache layers return.
    """
    config = model.config.get_text_config(decoder=True)
    layer_types = list(getattr(config, "layer_types", None) or [])
    if set(layer_types) <= {"full_attention"}:
        if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            raise UnsupportedError(
                f"{type(model).__name__} has sliding-window cache layers but no `config.layer_types` naming them; "
                "hf_spec cannot build its tree masks. Use a chain drafter or plain generate()."
            )
        return _additive(allowed, model.dtype)
    masks = {}
    for layer_type in set(layer_types):
        if layer_type == "full_attention":
            masks[layer_type] = _additive(allowed, model.dtype)
        elif layer_type == "sliding_attention":
            pattern = _sliding_pattern(allowed, config.sliding_window)
            masks[layer_type] = _additive(_visible_part(pattern, cache, layer_types.index(layer_type)), model.dtype)
        else:
            raise UnsupportedError(
                f"Layer type {layer_type!r} of {type(model).__name__} is not supported with tree drafts "
                "(only 'full_attention' and 'sliding_attention'); use a chain drafter or plain generate()."
            )
    return masks


def _sliding_pattern(allowed: torch.Tensor, window: int) -> torch.Tensor:
    """Keep of each row its last ``window`` allowed keys."""
    allowed_from_here = allowed.flip(-1).cumsum(-1).flip(-1)  # allowed keys at or after each column
    return allowed & (allowed_from_here <= window)


def _visible_part(pattern: torch.Tensor, cache, layer_index: int) -> torch.Tensor:
    """The columns of ``pattern`` a cache layer returns to attention (a sliding layer: the tail only)."""
    kv_length, kv_offset = cache.get_mask_sizes(pattern.shape[0], layer_index)
    if kv_offset + kv_length != pattern.shape[1] or pattern[:, :kv_offset].any():
        raise RuntimeError(
            f"Cache layer {layer_index} returns keys {kv_offset}..{kv_offset + kv_length - 1} but the tree attends to "
            f"{pattern.shape[1]} positions inside the window: the cache dropped keys this forward needs "
            "(a sliding-window cache that grew several tree levels without rolling back? use full_history_cache)."
        )
    return pattern[:, kv_offset:]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


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
    if getattr(logits_processor, "ignores_input_ids", False):  # temperature, top-k, top-p...: one call for all rows
        return logits_processor(input_ids.expand(logits.shape[0], -1), logits)
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
