"""EAGLE-3 inference: an EAGLE-2 dynamic tree drafted by the draft layer over its own KV cache.

At each step the engine hands over the target's fused features of the rows committed since the last step (the
whole prompt first, then the root and the accepted path: the verification forward captured them, no second
target pass). The drafter runs its layer on those rows, appending them to its cache, so the cache always holds
exactly the committed prefix computed from the *target's* features (EAGLE's recomputation: the draft's own
guesses for accepted tokens are replaced by what the target actually produced). From the last row it grows a
tree level by level (``hf_spec.engine.dynamic_tree``): each level runs the layer once over the expanded nodes
with tree attention, every node seeing the prefix, its ancestors and itself, and feeding its own output as the
hidden state of its children. Tree rows are dropped from the cache after the step.

Tokens are top-k choices of the draft (point masses), so every verification rule of the engine keeps the
output exactly the target's (greedy) or distributed as the target's (sampling).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...engine.dynamic_tree import (
    TreeSpec,
    grow_tree,
    grown_tree_for_call,
    grown_tree_spec,
    node_path,
    tree_rows_mask,
)
from ...engine.tree import DraftTree
from ..base import DraftRequest, Drafter
from .model import Eagle3Draft


class Eagle3Drafter(Drafter):
    """Draft EAGLE-2 trees with a trained EAGLE-3 draft layer.

    Args:
        draft_layer: the trained ``Eagle3Draft`` (``Eagle3Drafter.from_pretrained`` loads one).
        tree: ``"dynamic"`` (default: the checkpoint's ``tree_depth`` / ``tree_top_k`` / ``tree_budget``) or
            ``"chain"`` (the draft's top-1 for ``tree_depth`` tokens) or ``"static"`` (the chain plus ``top_k - 1``
            alternatives at each depth). ``generate(tree=..., tree_depth=...,
            tree_top_k=..., tree_budget=...)`` reshapes one call.
        depth, top_k, budget: override the checkpoint's tree sizes.
    """

    def __init__(self, draft_layer: Eagle3Draft, tree: str = "dynamic", depth: int | None = None,
                 top_k: int | None = None, budget: int | None = None):
        super().__init__()
        if not isinstance(draft_layer, Eagle3Draft):
            raise TypeError(f"Eagle3Drafter takes a trained Eagle3Draft, got {type(draft_layer).__name__}; load one "
                            "with Eagle3Drafter.from_pretrained(path_or_id, target=model).")
        config = draft_layer.config
        depth = depth or config.tree_depth
        self.default_tree_spec = grown_tree_spec(tree, depth, top_k, budget, config.tree_top_k, config.tree_budget,
                                                 "Eagle3Drafter")
        self.tree_spec = self.default_tree_spec
        self.draft = draft_layer.eval()
        self.target_features = tuple(config.feature_layers)
        self._embed = None
        self._keys = self._values = None
        self._root_output: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, target, *, tree: str = "dynamic", depth: int | None = None,
                        top_k: int | None = None, budget: int | None = None, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False) -> Eagle3Drafter:
        """Load a draft layer from a folder or Hub repo id, check it against ``target`` and build the drafter."""
        draft = Eagle3Draft.from_pretrained(path_or_id, target=target, revision=revision, token=token,
                                            local_files_only=local_files_only)
        return cls(draft, tree=tree, depth=depth, top_k=top_k, budget=budget)

    def begin(self, target, input_ids, generation_config, logits_processor, tree_spec: TreeSpec | None = None,
              **options) -> None:
        super().begin(target, input_ids, generation_config, logits_processor, **options)
        self.draft.check_compatible(target, note_base_model=False)
        weight = target.get_output_embeddings().weight
        first = next(self.draft.parameters())
        if first.device != weight.device or first.dtype != weight.dtype:
            self.draft.to(device=weight.device, dtype=weight.dtype)
        self.tree_spec = grown_tree_for_call(tree_spec, self.default_tree_spec, "Eagle3Drafter")
        self._embed = target.get_input_embeddings()
        self._keys, self._values = self.draft.empty_cache(weight.device)
        self._root_output = None

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> DraftTree:
        input_ids = request.input_ids
        device = input_ids.device
        if request.target_features is not None and request.target_features.shape[1] > 0:
            self._commit(input_ids, request.target_features)
        depth = min(self.tree_spec.depth, request.max_tokens)
        if depth == 0 or self._root_output is None:
            return DraftTree.empty(device)
        committed = self._keys.shape[2]
        outputs: dict[int, torch.Tensor] = {-1: self._root_output}
        cache_row: dict[int, int] = {}

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            if frontier != [-1]:
                self._draft_nodes(frontier, tokens, parents, outputs, cache_row, committed)
            logits = self.draft.to_target_logits(self.draft.logits(torch.stack([outputs[node] for node in frontier])))
            paths = [node_path(node, tokens, parents) for node in frontier]
            sequences = torch.cat([input_ids.expand(len(frontier), -1), input_ids.new_tensor(paths)], dim=1)
            return torch.log_softmax(self.logits_processor(sequences, logits.float()), dim=-1)

        spec = self.tree_spec
        tree = grow_tree(expand, spec, depth, device)
        self._keys, self._values = self._keys[:, :, :committed], self._values[:, :, :committed]
        return tree

    def _commit(self, input_ids: torch.Tensor, features: torch.Tensor) -> None:
        """Run the layer on the newly committed rows (feature at ``t`` with token ``t + 1``) and keep their keys."""
        rows = features.shape[1]
        length = input_ids.shape[1]
        first = length - 1 - rows
        positions = torch.arange(first, length - 1, device=input_ids.device)[None]
        hidden = self.draft.fuse(features[:1])
        embeddings = self._embed(input_ids[:1, first + 1 : length]).to(hidden.dtype)
        past = self._keys.shape[2]
        allowed = torch.ones(rows, past + rows, dtype=torch.bool, device=input_ids.device)
        allowed[:, past:] = torch.tril(allowed[:, past:])
        output, keys, values = self.draft.step(embeddings, hidden, positions, self._keys, self._values, allowed)
        self._keys, self._values = torch.cat([self._keys, keys], dim=2), torch.cat([self._values, values], dim=2)
        self._root_output = output[0, -1]

    def _draft_nodes(self, nodes: list[int], tokens: list[int], parents: list[int], outputs: dict, cache_row: dict,
                     committed: int) -> None:
        """One tree level: each node's row reads its parent's output and its own token; rows see the committed
        prefix, their ancestors and themselves."""
        device = self._keys.device
        allowed, depths = tree_rows_mask(nodes, parents, cache_row, self._keys.shape[2], committed)
        allowed = allowed.to(device)
        hidden = torch.stack([outputs[parents[node]] for node in nodes])[None]
        embeddings = self._embed(torch.tensor([[tokens[node] for node in nodes]], device=device)).to(hidden.dtype)
        positions = (committed - 1 + torch.tensor(depths, device=device))[None]
        output, keys, values = self.draft.step(embeddings, hidden, positions, self._keys, self._values, allowed)
        self._keys, self._values = torch.cat([self._keys, keys], dim=2), torch.cat([self._values, values], dim=2)
        for row, node in enumerate(nodes):
            outputs[node] = output[0, row]

    def __repr__(self) -> str:
        spec = self.default_tree_spec
        return (f"Eagle3Drafter(layers={list(self.target_features)}, tree={spec.shape!r}, depth={spec.depth}, "
                f"top_k={spec.top_k}, budget={spec.budget})")

