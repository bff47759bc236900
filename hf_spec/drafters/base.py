"""The drafter protocol: how a drafter meets the engine.

The engine calls ``begin`` once per ``generate()`` call, then per step ``propose`` (a draft tree
below the last committed token) and ``observe`` (what the target accepted). A drafter never
verifies anything; the engine never looks inside a drafter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList

from ..engine.stats import GenerationStats
from ..engine.tree import DraftTree
from ..errors import UnsupportedError


@dataclass
class DraftRequest:
    """What a drafter knows when it proposes.

    Attributes:
        input_ids: ``(1, length)`` committed tokens; the last one is the root of the draft tree.
        max_tokens: the most draft tokens worth proposing (more could never be emitted).
        target_hidden: the target's last-layer hidden state at the position before the root (the
            one that produced the root), for drafters that set ``needs_target_hidden_states``.
    """

    input_ids: torch.Tensor
    max_tokens: int
    target_hidden: torch.Tensor | None = None


class Drafter(ABC):
    """Base class of every hf_spec drafter; pass an instance as ``generate(assistant_model=...)``."""

    needs_target_hidden_states: bool = False

    def __init__(self):
        self.stats = GenerationStats()
        self.do_sample = False
        self.logits_processor = LogitsProcessorList()
        self.sibling_scheme = "top_k"

    def begin(self, target, input_ids: torch.Tensor, generation_config: GenerationConfig,
              logits_processor: LogitsProcessorList, sibling_scheme: str = "top_k", tree=None) -> None:
        """Start a generate() call: check compatibility with ``target`` and reset per-call state.

        ``logits_processor`` is the target's: drafters that produce distributions run their logits
        through it so that they sample from (and report) the same processed distributions the
        target is verified with. ``sibling_scheme`` (see ``hf_spec.engine.siblings``) is how the
        verification rule needs several candidates for one node to be drawn. ``tree`` (a
        ``TreeSpec`` from ``generate(tree=...)``) is only accepted by drafters that build such trees.
        """
        if tree is not None:
            raise UnsupportedError(
                f"{type(self).__name__} does not take generate(tree=...); tree shapes are options of drafters "
                "that grow trees from distributions, e.g. DraftModelDrafter."
            )
        self.stats = GenerationStats()
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.sibling_scheme = sibling_scheme

    @abstractmethod
    def propose(self, request: DraftRequest) -> DraftTree:
        """Propose a draft tree (possibly empty) below ``request.input_ids[0, -1]``."""

    def observe(self, tree: DraftTree, num_accepted: int) -> None:
        """Called after each verification with the tree and how many of its tokens were accepted."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
