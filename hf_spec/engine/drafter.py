"""The drafter protocol, owned by the engine: how any drafter meets the speculative loop.

Per ``generate()`` call the engine calls ``begin`` once; then, per step, ``propose`` (a draft tree
below the last committed token) and ``observe`` (which nodes the target accepted and the token it
added). A drafter never verifies anything; the engine never looks inside a drafter.

A drafter that reads the target's hidden states names the layers in ``target_features`` (see
``hf_spec.engine.features`` for the names). The engine captures them during the forwards it runs
anyway (the prefill and each verification forward, no second target pass) and hands over the
features of every position committed since the last ``propose``: the whole prompt at the first
step, then the root and every accepted node of the previous step. Shapes keep a leading batch
dimension so that batched decoding can use the same protocol.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList

from ..errors import UnsupportedError
from .appended_rows import AppendedRows
from .stats import GenerationStats
from .tree import DraftTree


@dataclass
class DraftRequest:
    """What a drafter knows when it proposes.

    Attributes:
        input_ids: ``(batch, length)`` committed tokens; the last one is the root of the draft tree.
        max_tokens: the most draft tokens worth proposing (more could never be emitted).
        engine_sets_length: ``max_tokens`` is the depth the engine chose for this step (``draft_length="goodput"``
            once it has estimates), not only a bound: a drafter whose length is a setting rather than its
            structure may draft up to it, past its own default (``DraftModelDrafter``: up to ``max_num_tokens``).
        target_features: ``(batch, rows, dim)`` features (the layers of ``Drafter.target_features``,
            concatenated) of the committed positions ``length - 1 - rows .. length - 2`` that the
            drafter has not been given before. The feature at position ``t`` is the target's state
            that predicted token ``t + 1``, so the last row is the one that produced the root.
            ``None`` for drafters that ask for no features.
    """

    input_ids: torch.Tensor
    max_tokens: int
    target_features: torch.Tensor | None = None
    engine_sets_length: bool = False

    @property
    def last_feature(self) -> torch.Tensor:
        """``(dim,)``: the feature that produced the root (first sequence of the batch)."""
        if self.target_features is None or self.target_features.shape[1] == 0:
            raise ValueError("No target features in this request: set Drafter.target_features to ask for them.")
        return self.target_features[0, -1]


@dataclass(frozen=True)
class StepOutcome:
    """What the target made of one proposal.

    Attributes:
        tree: the proposed tree.
        accepted_nodes: the accepted path (node indices, root to leaf), as far as it was emitted.
        next_token: the target's own token after that path (correction or bonus); ``None`` when a
            stopping criterion ended generation before it.
    """

    tree: DraftTree
    accepted_nodes: list[int]
    next_token: int | None

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)


class Drafter(ABC):
    """Base class of every hf_spec drafter; pass an instance as ``generate(assistant_model=...)``.

    ``target_features``: target layers this drafter reads (``hf_spec.engine.features`` names, e.g.
    ``("final",)`` for Medusa, ``(2, n // 2, n - 3)`` for EAGLE-3); empty for none.
    ``wraps_target``: building the drafter wrapped its target's layers in place (gated-LoRA MTP); generate with
    ``drafter.model``, the model it wraps.
    """

    target_features: tuple = ()
    wraps_target: bool = False

    def __init__(self):
        self.stats = GenerationStats()
        self.do_sample = False
        self.logits_processor = LogitsProcessorList()
        self.sibling_scheme = "top_k"

    def begin(self, target, input_ids: torch.Tensor, generation_config: GenerationConfig,
              logits_processor: LogitsProcessorList, sibling_scheme: str = "top_k", tree_spec=None) -> None:
        """Start a generate() call: check compatibility with ``target`` and reset per-call state.

        ``logits_processor`` is the target's (wrapped for tree rows: call it on ``(rows, length)``
        ids and ``(rows, vocab)`` scores): drafters that produce distributions run their logits
        through it so that they sample from (and report) the same processed distributions the
        target is verified with. ``sibling_scheme`` (see ``hf_spec.engine.siblings``) is how the
        verification rule needs several candidates for one node to be drawn. ``tree_spec`` (the
        ``TreeSpec`` of ``generate(tree=...)``) is only accepted by drafters that build such trees.
        """
        if tree_spec is not None:
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

    def appended_rows(self, tree: DraftTree, next_step_drafts: bool = True) -> AppendedRows | None:
        """Rows to run after ``tree``'s block rows in this step's verification forward (``None``: none).

        For drafters that draft inside the target's forward (gated-LoRA MTP); see
        ``hf_spec.engine.appended_rows``. Called once per step, after ``propose``; ``next_step_drafts`` is False when
        the engine does not expect the next step to draft (the cost-aware policy found no depth that pays), so rows
        that only prepare the next step's drafts can be left out."""
        return None

    def observe(self, outcome: StepOutcome) -> None:
        """Called after each verification: which nodes were accepted and what the target added."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
