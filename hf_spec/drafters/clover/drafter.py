"""Clover-2 inference: dynamic trees (or chains) drafted by the chained heads over the target's prefix features.

At each step the engine hands over the target's last pre-norm hidden states of the rows committed since the last
step (no second target pass). The drafter appends their attention-decoder keys and values to its prefix cache,
so the cache always holds exactly the committed prefix, and keeps the newest one as the first state. A tree then
grows level by level (``hf_spec.engine.dynamic_tree``): expanding a node at depth ``d`` runs head ``d`` on its
parent's state and the tokens of its path, and the head's logits give the node's children. Tokens are top-k
choices (point masses), so every verification rule keeps the output exactly the target's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...engine.dynamic_tree import TreeSpec, grow_tree, grown_tree_for_call, grown_tree_spec, node_path
from ...engine.tree import DraftTree
from ..base import Drafter, DraftRequest
from .model import CloverHeads


class CloverDrafter(Drafter):
    """Draft trees with trained Clover-2 heads.

    Args:
        heads: the trained ``CloverHeads``.
        tree: ``"dynamic"`` (default; depth ``num_heads``, the checkpoint's ``tree_top_k`` / ``tree_budget``) or
            ``"chain"`` (each head's top-1) or ``"static"`` (the chain plus ``top_k - 1`` alternatives at each depth).
            ``generate(tree=..., tree_depth=..., tree_top_k=..., tree_budget=...)``
            reshapes one call; the depth is at most the number of heads.
        depth, top_k, budget: override the checkpoint's tree sizes.
    """

    def __init__(self, heads: CloverHeads, tree: str = "dynamic", depth: int | None = None, top_k: int | None = None,
                 budget: int | None = None):
        super().__init__()
        if not isinstance(heads, CloverHeads):
            raise TypeError(f"CloverDrafter takes trained CloverHeads, got {type(heads).__name__}; load them with "
                            "CloverDrafter.from_pretrained(path_or_id, target=model).")
        config = heads.config
        if depth is not None and depth > config.num_heads:
            raise ValueError(f"These heads draft at most {config.num_heads} tokens deep, got depth={depth}.")
        depth = depth or config.num_heads
        self.default_tree_spec = grown_tree_spec(tree, depth, top_k, budget, config.tree_top_k, config.tree_budget,
                                                 "CloverDrafter")
        self.tree_spec = self.default_tree_spec
        self.heads = heads.eval()
        self.target_features = (config.feature_layer,)
        self._embed = None
        self._prefix_keys = self._prefix_values = None
        self._anchor: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, target, *, tree: str = "dynamic", depth: int | None = None,
                        top_k: int | None = None, budget: int | None = None, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False) -> CloverDrafter:
        """Load heads from a folder or Hub repo id, check them against ``target`` and build the drafter."""
        heads = CloverHeads.from_pretrained(path_or_id, target=target, revision=revision, token=token,
                                            local_files_only=local_files_only)
        return cls(heads, tree=tree, depth=depth, top_k=top_k, budget=budget)

    def begin(self, target, input_ids, generation_config, logits_processor, tree_spec: TreeSpec | None = None,
              **options) -> None:
        super().begin(target, input_ids, generation_config, logits_processor, **options)
        self.heads.check_compatible(target, note_base_model=False)
        weight = target.get_output_embeddings().weight
        first = next(self.heads.parameters())
        if first.device != weight.device or first.dtype != weight.dtype:
            self.heads.to(device=weight.device, dtype=weight.dtype)
        self.tree_spec = grown_tree_for_call(tree_spec, self.default_tree_spec, "CloverDrafter",
                                             max_depth=self.heads.config.num_heads)
        self._embed = target.get_input_embeddings()
        self._prefix_keys = self._prefix_values = None
        self._anchor = None

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> DraftTree:
        input_ids = request.input_ids
        if request.target_features is not None and request.target_features.shape[1] > 0:
            self._commit(input_ids, request.target_features)
        depth = min(self.tree_spec.depth, request.max_tokens)
        if depth == 0 or self._anchor is None:
            return DraftTree.empty(input_ids.device)
        root = input_ids.shape[1] - 1
        # state fed to a node's expansion: its parent's new state; the root's is the anchor feature, replaced by the
        # root's own new state once expanded (which the depth-1 nodes, whose parent is -1, then read)
        states: dict[int, torch.Tensor] = {-1: self._anchor}

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            paths = [node_path(node, tokens, parents) for node in frontier]
            head = len(paths[0])
            parent_states = torch.stack([states[parents[node]] if node >= 0 else states[-1] for node in frontier])
            new_states = self._run_head(input_ids, root, paths, parent_states)
            for row, node in enumerate(frontier):
                states[node] = new_states[row]
            logits = self.heads.to_target_logits(self.heads.logits(head, new_states))
            sequences = torch.cat([input_ids.expand(len(frontier), -1), input_ids.new_tensor(paths)], dim=1)
            return torch.log_softmax(self.logits_processor(sequences, logits.float()), dim=-1)

        spec = self.tree_spec
        return grow_tree(expand, spec, depth, input_ids.device)

    def _commit(self, input_ids: torch.Tensor, features: torch.Tensor) -> None:
        """Append the prefix keys of newly committed rows (the feature at ``t`` sits at position ``t``)."""
        rows, length = features.shape[1], input_ids.shape[1]
        positions = torch.arange(length - 1 - rows, length - 1, device=input_ids.device)[None]
        features = features[:1].to(self.heads.lm_head.weight.dtype)
        keys, values = self.heads.decoder.prefix_keys(features, positions)
        if self._prefix_keys is None:
            self._prefix_keys, self._prefix_values = keys, values
        else:
            self._prefix_keys = torch.cat([self._prefix_keys, keys], dim=2)
            self._prefix_values = torch.cat([self._prefix_values, values], dim=2)
        self._anchor = features[0, -1]

    def _run_head(self, input_ids, root: int, paths: list[list[int]], parent_states: torch.Tensor) -> torch.Tensor:
        """The next state of each frontier node (one row per node, its path's tokens as regressive keys)."""
        device = input_ids.device
        path_tokens = torch.cat([input_ids[0, root:].expand(len(paths), 1), input_ids.new_tensor(paths)], dim=1)
        token_positions = (root + torch.arange(path_tokens.shape[1], device=device)).expand(len(paths), -1)
        embeddings = self._embed(path_tokens).to(parent_states.dtype)
        keys, values = self.heads.regressive.token_keys(embeddings, token_positions)
        positions = token_positions[:, -1:]
        everything = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        prefix_allowed = everything.expand(1, 1, 1, self._prefix_keys.shape[2])
        states = self.heads.step(parent_states[:, None], positions, keys, values,
                                 everything.expand(len(paths), 1, 1, path_tokens.shape[1]), self._prefix_keys,
                                 self._prefix_values, prefix_allowed)
        return states[:, 0]

    def __repr__(self) -> str:
        spec = self.default_tree_spec
        return (f"CloverDrafter(heads={self.heads.config.num_heads}, tree={spec.shape!r}, depth={spec.depth}, "
                f"top_k={spec.top_k}, budget={spec.budget})")
