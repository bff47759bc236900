"""An early-exit draft model: the target's first layers, its final norm and its LM head, sharing weights.

A draft for targets that have no smaller sibling, at no extra memory: the self-speculation idea of
Draft & Verify (Zhang et al. 2024) and LayerSkip (Elhoushi et al. 2024), here without the training
that makes early exits accurate, so expect low acceptance. It is an ordinary ``PreTrainedModel``,
usable by ``DraftModelDrafter`` and by transformers' own assisted generation alike.
"""

from __future__ import annotations

import copy
import re

import torch

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def early_exit_model(target, num_layers: int):
    """A model of ``target``'s class running only its first ``num_layers`` decoder layers (weights shared)."""
    total = target.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"num_layers must be between 1 and {total - 1} for this {total}-layer target, got {num_layers}.")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        draft = type(target)(config)
    kept = {name: tensor for name, tensor in target.state_dict().items() if _keeps(name, num_layers)}
    draft.load_state_dict(kept, strict=True, assign=True)
    _share_non_persistent_buffers(target, draft)
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.eval()


def _keeps(name: str, num_layers: int) -> bool:
    match = _LAYER_INDEX.search(name)
    return match is None or int(match.group(1)) < num_layers


def _share_non_persistent_buffers(source, destination) -> None:
    """Buffers left out of state_dict (e.g. rotary inverse frequencies) are still on the meta device."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(destination.named_buffers()):
        if buffer.is_meta:
            owner_name, _, attribute = name.rpartition(".")
            owner = destination.get_submodule(owner_name) if owner_name else destination
            setattr(owner, attribute, source_buffers[name])
