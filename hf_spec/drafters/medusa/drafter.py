"""Medusa inference: draft a tree from the heads on the target's hidden state of the last committed token.

Candidates form a static tree of *rank paths* (``rank_tree.py``): the default tree follows the paper's
construction from each head's measured rank accuracies. The ``chain`` and ``dynamic`` tree shapes
(``hf_spec.engine.dynamic_tree``) are available too. The engine verifies the tree (greedy, lossless
rejection sampling, or any other rule it is asked for); Medusa itself never decides acceptance.

Heads with a draft vocabulary (``MedusaHeads.draft_vocab``) score only its ``N`` tokens; their logits are put
back in target-id space with ``-inf`` outside the subset before the target's logits processors, so every
proposal is a target id and a sampled proposal's ``draft_probs`` are exactly zero outside the subset (unless a
processor forces a token there, e.g. a forced EOS). Rejection sampling only needs ``q`` to be the distribution
each draft was drawn from, so verification stays exact (the residual ``max(p - q, 0)`` still reaches every
token). Static trees keep only nodes whose ranks exist among
the ``N`` tokens.

Medusa-1 trains the heads with the target frozen; Medusa-2 also trains LoRA adapters on the target
(``hf_spec.training``), in which case generate with the target that has those adapters merged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ...engine.dynamic_tree import TREE_SHAPES, TreeSpec, grow_dynamic_tree
from ...engine.features import FINAL
from ...engine.siblings import draw_siblings
from ...engine.tree import DraftTree
from ..base import DraftRequest, Drafter
from .config import MedusaConfig, head_rank_accuracies
from .heads import MedusaHeads
from .rank_tree import RankPath, RankTree, best_rank_tree, chain_paths, validate_rank_paths

logger = logging.getLogger(__name__)


class MedusaDrafter(Drafter):
    """Draft a tree from the Medusa heads on the target's hidden state of the last committed token.

    Args:
        heads: trained ``MedusaHeads``.
        tree: the tree shape (``hf_spec.engine.dynamic_tree.TREE_SHAPES``). ``None`` or ``"static"``: a static
            tree of rank paths, ``rank_paths`` if given, else the checkpoint's ``rank_paths``, else the best
            tree of ``num_nodes`` nodes for the checkpoint's measured head accuracies (the Medusa paper's
            construction). ``"chain"``: top-1 of every head. ``"dynamic"``: an EAGLE-2-style tree of
            ``num_nodes`` nodes grown from each step's head confidences (``hf_spec.engine.dynamic_tree``).
        rank_paths: the static tree itself, as rank paths such as ``[(0,), (1,), (0, 0), (0, 1), (1, 0)]``
            (``rank_tree.py``: node ``(..., r)`` at depth ``d`` is head ``d-1``'s ``r``-th best token).
        num_nodes: node budget of the derived or dynamic tree (default: the checkpoint's
            ``default_num_nodes``).
        proposal: ``"topk"`` proposes node ``(..., r)`` deterministically as its head's ``r``-th best token
            (point masses: lossless with every verification rule). ``"sample"`` draws the children of each
            node from the head's distribution (after the target's logits processors) in the way the
            verification rule asks for (``hf_spec.engine.siblings``) and reports each draw's distribution
            in ``draft_probs``; under greedy decoding it is the same as ``"topk"``.

    ``generate(tree="chain" | "static" | "dynamic", tree_budget=..., tree_depth=..., tree_top_k=...)``
    reshapes the tree for one call: ``"static"`` is the accuracy-derived tree with ``tree_budget`` nodes
    and ranks below ``tree_top_k``; ``"dynamic"`` grows an EAGLE-2-style tree from this step's head
    confidences.

    Verification is the engine's (``generate(verification=...)``). Medusa's "typical acceptance" is a
    lossy rule the engine applies only when asked explicitly; the default rules keep the output exactly
    the target's (greedy) or distributed exactly as the target's (sampling).
    """

    target_features = (FINAL,)  # Medusa heads read the last hidden state after the final norm

    def __init__(self, heads: MedusaHeads, tree: str | None = None, rank_paths: list | None = None,
                 num_nodes: int | None = None, proposal: str = "topk"):
        super().__init__()
        if proposal not in ("topk", "sample"):
            raise ValueError(f"proposal must be 'topk' or 'sample', got {proposal!r}.")
        shape = _check_shape(tree, rank_paths, num_nodes)
        config = heads.config
        self.heads = heads.eval()
        self.proposal = proposal
        if shape == "static":
            self.default_rank_tree = self._fit(RankTree(self._static_paths(config, rank_paths, num_nodes)))
        else:
            self.default_rank_tree = RankTree(chain_paths(config.num_heads))
        # The TreeSpec of a dynamic tree (None: draft the static rank tree), by default and for this call.
        self.default_dynamic_spec = (TreeSpec("dynamic", budget=num_nodes or config.default_num_nodes)
                                     if shape == "dynamic" else None)
        self.rank_tree, self.dynamic_spec = self.default_rank_tree, self.default_dynamic_spec
        self._lm_head: nn.Module | None = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, target, *, tree: str | None = None,
                        rank_paths: list | None = None, num_nodes: int | None = None, proposal: str = "topk",
                        revision: str | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> MedusaDrafter:
        """Load heads from a folder or Hub repo id, check them against ``target`` and build the drafter.

        For a Medusa-2 checkpoint (``config.adapter`` set) ``target`` must already carry the trained
        adapters merged: ``PeftModel.from_pretrained(base, folder / adapter).merge_and_unload()``.
        """
        heads = MedusaHeads.from_pretrained(path_or_id, target=target, revision=revision, token=token,
                                            local_files_only=local_files_only)
        if heads.config.medusa_version == 2:
            logger.info("Medusa-2 heads: generate with the target whose LoRA adapter (%s) is merged.", heads.config.adapter)
        return cls(heads, tree=tree, rank_paths=rank_paths, num_nodes=num_nodes, proposal=proposal)

    @staticmethod
    def _static_paths(config: MedusaConfig, rank_paths, num_nodes: int | None) -> list[RankPath]:
        if rank_paths is not None:
            paths = [tuple(int(rank) for rank in path) for path in rank_paths]
            validate_rank_paths(paths, config.num_heads)
            return paths
        if num_nodes is None and config.rank_paths is not None:
            return [tuple(path) for path in config.rank_paths]
        return best_rank_tree(head_rank_accuracies(config), num_nodes or config.default_num_nodes)

    @property
    def rank_paths(self) -> list[RankPath]:
        """The rank paths drafted (this call's after ``begin``); for a dynamic tree, its depth as a chain."""
        return list(self.rank_tree.paths)

    def begin(self, target, input_ids, generation_config, logits_processor, tree_spec: TreeSpec | None = None,
              **options) -> None:
        """``tree_spec`` is the ``TreeSpec`` of ``generate(tree=...)``, ``None`` for the constructor's tree."""
        super().begin(target, input_ids, generation_config, logits_processor, **options)
        self.heads.check_compatible(target, note_base_model=False)
        self._lm_head = target.get_output_embeddings() if self.heads.config.share_lm_head else None
        weight = target.get_output_embeddings().weight
        first = next(self.heads.parameters())
        if first.device != weight.device or first.dtype != weight.dtype:
            self.heads.to(device=weight.device, dtype=weight.dtype)
        rank_tree, self.dynamic_spec = self._tree_for_call(tree_spec)
        self.rank_tree = self._fit(rank_tree)

    def _fit(self, rank_tree: RankTree) -> RankTree:
        """``rank_tree`` without the nodes (and their subtrees) whose ranks the heads cannot fill: with a draft
        vocabulary of ``N`` tokens, a head has no ``N``-th best token."""
        vocabulary = self.heads.draft_vocab
        return rank_tree if vocabulary is None else rank_tree.with_ranks_below(vocabulary.size)

    def _tree_for_call(self, tree_spec: TreeSpec | None) -> tuple[RankTree, TreeSpec | None]:
        if tree_spec is None:
            return self.default_rank_tree, self.default_dynamic_spec
        num_heads = self.heads.config.num_heads
        depth = min(tree_spec.depth or num_heads, num_heads)
        if tree_spec.shape == "chain":
            return RankTree(chain_paths(depth)), None
        if tree_spec.shape == "dynamic":
            return RankTree(chain_paths(depth)), tree_spec
        accuracies = [row[: tree_spec.top_k] for row in head_rank_accuracies(self.heads.config)[:depth]]
        return RankTree(best_rank_tree(accuracies, tree_spec.budget)), None

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> DraftTree:
        device = request.input_ids.device
        skeleton = self.rank_tree
        if skeleton.max_depth > request.max_tokens:
            skeleton = skeleton.up_to_depth(request.max_tokens)
        if request.target_features is None or skeleton.max_depth == 0:
            return DraftTree.empty(device)
        hidden = request.last_feature
        num_heads = skeleton.max_depth
        logits = torch.stack([self.heads.head_logits(k, hidden[None], self._lm_head)[0] for k in range(num_heads)])
        logits = self.heads.to_target_logits(logits.float())  # target ids; -inf outside a draft vocabulary
        scores = self.logits_processor(request.input_ids.expand(num_heads, -1), logits)
        if self.heads.draft_vocab is not None:
            skeleton, scores = _heads_with_candidates(skeleton, scores)
            if skeleton.max_depth == 0:
                return DraftTree.empty(device)
        if self.dynamic_spec is not None:
            return self._dynamic_tree(torch.log_softmax(scores, dim=-1), device)
        if self.proposal == "sample" and self.do_sample:
            return self._sampled_tree(skeleton, torch.softmax(scores, dim=-1), self.sibling_scheme, device)
        return self._topk_tree(skeleton, scores, device)

    @staticmethod
    def _topk_tree(skeleton: RankTree, scores: torch.Tensor, device) -> DraftTree:
        """Node ``(..., r)`` at depth ``d`` gets head ``d-1``'s ``r``-th best token (deterministic)."""
        top = scores.topk(max(skeleton.ranks) + 1, dim=-1).indices
        heads_of_nodes = torch.tensor(skeleton.depths, device=device) - 1
        tokens = top[heads_of_nodes, torch.tensor(skeleton.ranks, device=device)]
        return DraftTree(tokens.long(), torch.tensor(skeleton.parents, dtype=torch.long, device=device))

    @staticmethod
    def _sampled_tree(skeleton: RankTree, probs: torch.Tensor, scheme: str, device) -> DraftTree:
        """The children of each node are drawn together from their head's distribution with ``scheme``.

        Each node's ``draft_probs`` row is the distribution it was drawn from (``draw_siblings``). Skeleton
        nodes left without a token (a distribution with too little support) are dropped with their subtrees.
        """
        children: dict[int, list[int]] = {}
        for node, parent in enumerate(skeleton.parents):
            children.setdefault(parent, []).append(node)
        tokens, parents, rows = [], [], []
        new_index = {-1: -1}
        for node in [-1] + list(range(len(skeleton.parents))):
            if node not in new_index or node not in children:
                continue
            depth = skeleton.depths[node] if node >= 0 else 0
            drawn, distributions = draw_siblings(probs[depth], len(children[node]), scheme)
            for child, token, distribution in zip(children[node], drawn, distributions):
                new_index[child] = len(tokens)
                tokens.append(token)
                parents.append(new_index[node])
                rows.append(distribution)
        if not tokens:
            return DraftTree.empty(device)
        draft_probs = None if rows[0] is None else torch.stack(rows).to(device)
        return DraftTree(torch.tensor(tokens, dtype=torch.long, device=device),
                         torch.tensor(parents, dtype=torch.long, device=device), draft_probs)

    def _dynamic_tree(self, log_probs: torch.Tensor, device) -> DraftTree:
        """EAGLE-2-style growth where every node at depth ``d`` expands with head ``d``'s distribution."""
        tree_spec = self.dynamic_spec
        depth_of: dict[int, int] = {-1: 0}

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            for node in range(len(depth_of) - 1, len(parents)):
                depth_of[node] = depth_of[parents[node]] + 1
            return log_probs[[depth_of[node] for node in frontier]]

        return grow_dynamic_tree(expand, log_probs.shape[0], tree_spec.top_k, tree_spec.budget, device)

    def __repr__(self) -> str:
        config = self.heads.config
        if self.default_dynamic_spec is not None:
            shape = f"tree='dynamic', nodes={self.default_dynamic_spec.budget}"
        else:
            shape = f"nodes={len(self.default_rank_tree.paths)}"
        return (f"MedusaDrafter(heads={config.num_heads}, layers={config.num_layers}, {shape}, "
                f"depth={self.default_rank_tree.max_depth}, proposal={self.proposal!r})")


def _heads_with_candidates(skeleton: RankTree, scores: torch.Tensor) -> tuple[RankTree, torch.Tensor]:
    """Cut the tree above the first head with no token left after the logits processors (possible when a processor
    bans every token of a small draft vocabulary: its distribution would be undefined)."""
    usable = torch.isfinite(scores).any(-1).long().cumprod(0)
    depth = int(usable.sum())
    if depth == scores.shape[0]:
        return skeleton, scores
    return skeleton.up_to_depth(depth), scores[:depth]


def _check_shape(tree, rank_paths, num_nodes) -> str:
    """The constructor's tree shape (``None`` is ``"static"``), refusing combinations that mean nothing."""
    if tree is not None and not isinstance(tree, str):
        raise ValueError("tree= takes a shape name ('chain', 'static' or 'dynamic'); pass a list of rank paths "
                         "as rank_paths=.")
    shape = tree or "static"
    if shape not in TREE_SHAPES:
        raise ValueError(f"tree must be None or one of {TREE_SHAPES}, got {tree!r}.")
    if rank_paths is not None and shape != "static":
        raise ValueError(f"rank_paths is a static tree; it does not combine with tree={tree!r}.")
    if rank_paths is not None and num_nodes is not None:
        raise ValueError("num_nodes sizes a derived tree; rank_paths gives the tree itself, so pass one of them.")
    return shape
