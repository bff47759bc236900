"""Medusa (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads").

- ``config.py``: ``MedusaConfig``, what a checkpoint is;
- ``heads.py``: the heads (``MedusaHeads``: residual blocks + vocabulary projection);
- ``../persistence.py`` (shared with EAGLE-3): ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``;
- ``rank_tree.py``: static trees of rank paths and the paper's expected-length maths;
- ``drafter.py``: ``MedusaDrafter``, inference (proposes trees for the engine to verify).

Training lives in ``hf_spec.training.methods.medusa``.
"""

from .config import FORMAT_VERSION, MedusaConfig, head_rank_accuracies
from .drafter import MedusaDrafter
from .heads import MedusaHead, MedusaHeads, ResBlock, target_head_shape
from .rank_tree import (
    RankPath,
    RankTree,
    best_rank_tree,
    chain_paths,
    expected_accepted_length,
    prior_rank_accuracies,
    validate_rank_accuracies,
    validate_rank_paths,
)

__all__ = [
    "FORMAT_VERSION",
    "MedusaConfig",
    "MedusaDrafter",
    "MedusaHead",
    "MedusaHeads",
    "RankPath",
    "RankTree",
    "ResBlock",
    "best_rank_tree",
    "chain_paths",
    "expected_accepted_length",
    "head_rank_accuracies",
    "prior_rank_accuracies",
    "target_head_shape",
    "validate_rank_accuracies",
    "validate_rank_paths",
]
