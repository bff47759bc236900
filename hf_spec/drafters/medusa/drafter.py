"""Medusa inference: draft a tree from the heads on the target's hidden state of the last committed token.

Candidates form a static tree of *rank paths* (``rank_tree.py``): the default tree follows the paper's
construction from each head's measured rank accuracies. The engine verifies the tree (greedy, lossless
rejection sampling, or any other rule it is asked for); Medusa itself never decides acceptance.

Medusa-1 trains the heads with the target frozen; Medusa-2 also trains LoRA adapters on the target
(``hf_spec.training``), in which case generate with the target that has those adapters merged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ...engine.dynamic_tree import TreeSpec, grow_dynamic_tree
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
        tree: ``None`` (the best tree of ``num_nodes`` nodes for the checkpoint's measured head
            accuracies, as in the Medusa paper), ``"chain"`` (top-1 of every head), or a list of rank paths
            such as ``[(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]``.
        num_nodes: node budget of the derived tree (default: the checkpoint's ``default_num_nodes``).
        proposal: ``"topk"`` proposes node ``(..., r)`` deterministically as its head's ``r``-th best token
            (point masses: lossless with every verification rule). ``"sample"`` draws the children of each
            node from the head's distribution (after the target's logits processors) in the way the
            verification rule asks for (``hf_spec.engine.siblings``) and reports each draw's distribution
            in ``draft_probs``; under greedy decoding it is the same as ``"topk"``.

    ``generate(tree="chain" | "static" | "dynamic", tree_budget=..., tree_depth=..., tree_top_k=...)``
    reshapes the tree for one call: ``"static"`` is the accuracy-derived tree with ``tree_budget`` nodes
    and ranks below ``tree_top_k``; ``"dynamic"`` grows an EAGLE-2-style tree from this step's head
    confidences (``hf_spec.engine.dynamic_tree``).

    Verification is the engine's (``generate(verification=...)``). Medusa's "typical acceptance" is a
    lossy rule the engine applies only when asked explicitly; the default rules keep the output exactly
    the target's (greedy) or distributed exactly as the target's (sampling).
    """

    target_features = (FINAL,)  # Medusa heads read the last hidden state after the final norm

    def __init__(self, heads: MedusaHeads, tree: str | list | None = None, num_nodes: int | None = None,
                 proposal: str = "topk"):
        super().__init__()
        if proposal not in ("topk", "sample"):
            raise ValueError(f"proposal must be 'topk' or 'sample', got {proposal!r}.")
        self.heads = heads.eval()
        self.proposal = proposal
        self.default_rank_tree = RankTree(self._choose_paths(heads.config, tree, num_nodes))
        self.rank_tree = self.default_rank_tree
        self.dynamic: TreeSpec | None = None
        self._lm_head: nn.Module | None = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, target, *, tree: str | list | None = None,
                        num_nodes: int | None = None, proposal: str = "topk", revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False) -> MedusaDrafter:
        """Load heads from a folder or Hub repo id, check them against ``target`` and build the drafter.

        For a Medusa-2 checkpoint (``config.adapter`` set) ``target`` must already carry the trained
        adapters merged: ``PeftModel.from_pretrained(base, folder / adapter).merge_and_unload()``.
        """
        heads = MedusaHeads.from_pretrained(path_or_id, target=target, revision=revision, token=token,
                                            local_files_only=local_files_only)
        if heads.config.medusa_version == 2:
            logger.info("Medusa-2 heads: generate with the target whose LoRA adapter (%s) is merged.", heads.config.adapter)
        return cls(heads, tree=tree, num_nodes=num_nodes, proposal=proposal)

    @staticmethod
    def _choose_paths(config: MedusaConfig, tree, num_nodes: int | None) -> list[RankPath]:
        if tree == "chain":
            return chain_paths(config.num_heads)
        if tree is not None and not isinstance(tree, str):
            paths = [tuple(int(rank) for rank in path) for path in tree]
            validate_rank_paths(paths, config.num_heads)
            return paths
        if tree is not None:
            raise ValueError(f"tree must be None, 'chain' or a list of rank paths, got {tree!r}.")
        if num_nodes is None and config.tree is not None:
            return [tuple(path) for path in config.tree]
        return best_rank_tree(head_rank_accuracies(config), num_nodes or config.default_num_nodes)

    @property
    def tree_paths(self) -> list[RankPath]:
        return list(self.rank_tree.paths)

    def begin(self, target, input_ids, generation_config, logits_processor, tree: TreeSpec | None = None,
              **options) -> None:
        super().begin(target, input_ids, generation_config, logits_processor, **options)
        self.heads.check_compatible(target, note_base_model=False)
        self._lm_head = target.get_output_embeddings() if self.heads.config.share_lm_head else None
        weight = target.get_output_embeddings().weight
        first = next(self.heads.parameters())
        if first.device != weight.device or first.dtype != weight.dtype:
            self.heads.to(device=weight.device, dtype=weight.dtype)
        self.rank_tree, self.dynamic = self._tree_for_call(tree)

    def _tree_for_call(self, spec: TreeSpec | None) -> tuple[RankTree, TreeSpec | None]:
        if spec is None:
            return self.default_rank_tree, None
        num_heads = self.heads.config.num_heads
        depth = min(spec.depth or num_heads, num_heads)
        if spec.shape == "chain":
            return RankTree(chain_paths(depth)), None
        if spec.shape == "dynamic":
            return RankTree(chain_paths(depth)), spec
        accuracies = [row[: spec.top_k] for row in head_rank_accuracies(self.heads.config)[:depth]]
        return RankTree(best_rank_tree(accuracies, spec.budget)), None

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
        scores = self.logits_processor(request.input_ids.expand(num_heads, -1), logits.float())
        if self.dynamic is not None:
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
        spec = self.dynamic
        depth_of: dict[int, int] = {-1: 0}

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            for node in range(len(depth_of) - 1, len(parents)):
                depth_of[node] = depth_of[parents[node]] + 1
            return log_probs[[depth_of[node] for node in frontier]]

        return grow_dynamic_tree(expand, log_probs.shape[0], spec.top_k, spec.budget, device)

    def __repr__(self) -> str:
        config = self.heads.config
        tree = self.default_rank_tree
        return (f"MedusaDrafter(heads={config.num_heads}, layers={config.num_layers}, nodes={len(tree.paths)}, "
                f"depth={tree.max_depth}, proposal={self.proposal!r})")
