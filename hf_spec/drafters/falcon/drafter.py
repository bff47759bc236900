"""Falcon inference: trees grown pass by pass, each pass of the semi-autoregressive drafter emitting ``k`` tokens.

At each step the engine hands over the target's post-norm last hidden states of the rows committed since the last
step (the verification forward captured them). The drafter runs its LSTM and layer on those rows, appending their
keys and values to its cache (which holds exactly the committed prefix), and recomputes the outputs of the last
``k`` committed rows: one block, attending to each other and to everything before. Those outputs draft depths
``1..k``. A tree node at depth ``d = j * k`` then runs the next pass: the block of the ``k`` tokens on its path at
depths ``d - k + 1 .. d``, paired with the features the previous pass predicted, continuing the LSTM from the
previous block and attending to the committed prefix, the blocks of its ancestors' passes and itself. Its outputs
draft depths ``d + 1 .. d + k``.

Falcon's custom decoding tree (Gao et al. 2024) reuses one pass for all ``k`` depths it drafts; so does this one:
the distribution at depth ``d + 2`` is the same for every depth-``d + 1`` branch of a pass (the pass ran before
those tokens were chosen). Which branches grow is decided by cumulative draft probability under a node budget
(EAGLE-2's rule, ``hf_spec.engine.dynamic_tree``) instead of the paper's hand-set static shape. Tokens are top-k
choices (point masses), so every verification rule keeps the output exactly the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...engine.dynamic_tree import TreeSpec, grow_tree, grown_tree_for_call, grown_tree_spec, node_path
from ...engine.features import FINAL
from ...engine.tree import DraftTree
from ..base import DraftRequest, Drafter
from .model import FalconDraft


@dataclass
class _Pass:
    """One drafter pass: its ``k`` outputs ``(k, H)`` (the next block's features), their target-id logits and the
    LSTM state ``(h, c)`` after its block; ``first_row``: where its block's keys sit in the cache (None for the
    committed block)."""

    outputs: torch.Tensor
    logits: torch.Tensor
    state: tuple[torch.Tensor, torch.Tensor]
    first_row: int | None = None


class FalconDrafter(Drafter):
    """Draft trees with a trained Falcon semi-autoregressive drafter.

    Args:
        draft_head: the trained ``FalconDraft`` (``FalconDrafter.from_pretrained`` loads one).
        tree: ``"dynamic"`` (default: ``block_size * num_passes`` deep, the checkpoint's ``tree_top_k`` /
            ``tree_budget``), ``"chain"`` (the top-1 of every depth) or ``"static"`` (the chain plus ``top_k - 1``
            alternatives at each depth). ``generate(tree=..., tree_depth=...,
            tree_top_k=..., tree_budget=...)`` reshapes one call.
        depth, top_k, budget: override the checkpoint's tree sizes.
    """

    target_features = (FINAL,)

    def __init__(self, draft_head: FalconDraft, tree: str = "dynamic", depth: int | None = None,
                 top_k: int | None = None, budget: int | None = None):
        super().__init__()
        if not isinstance(draft_head, FalconDraft):
            raise TypeError(f"FalconDrafter takes a trained FalconDraft, got {type(draft_head).__name__}; load one "
                            "with FalconDrafter.from_pretrained(path_or_id, target=model).")
        config = draft_head.config
        depth = depth or config.tree_depth
        self.default_tree_spec = grown_tree_spec(tree, depth, top_k, budget, config.tree_top_k, config.tree_budget,
                                                 "FalconDrafter")
        self.tree_spec = self.default_tree_spec
        self.draft = draft_head.eval()
        self.block = config.block_size
        self._embed = None
        self._keys = self._values = None
        self._state = None
        self._tail = self._tail_positions = None
        self._root_pass: _Pass | None = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, target, *, tree: str = "dynamic", depth: int | None = None,
                        top_k: int | None = None, budget: int | None = None, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False) -> FalconDrafter:
        """Load a drafter from a folder or Hub repo id, check it against ``target`` and build the drafter."""
        draft = FalconDraft.from_pretrained(path_or_id, target=target, revision=revision, token=token,
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
        self.tree_spec = grown_tree_for_call(tree_spec, self.default_tree_spec, "FalconDrafter")
        self._embed = target.get_input_embeddings()
        self._keys, self._values = self.draft.empty_cache(weight.device)
        self._state = None
        self._tail = self._tail_positions = None
        self._root_pass = None

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> DraftTree:
        input_ids = request.input_ids
        device = input_ids.device
        if request.target_features is not None and request.target_features.shape[1] > 0:
            self._commit(input_ids, request.target_features)
        depth = min(self.tree_spec.depth, request.max_tokens)
        if depth == 0 or self._root_pass is None:  # fewer than k committed rows: no block to draft from yet
            return DraftTree.empty(device)
        committed = self._keys.shape[2]
        passes: dict[int, _Pass] = {-1: self._root_pass}
        root_position = input_ids.shape[1] - 1

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            paths = [node_path(node, tokens, parents) for node in frontier] if frontier != [-1] else [[]]
            level = len(paths[0])
            if level and level % self.block == 0:
                self._run_passes(frontier, paths, tokens, parents, passes, committed, root_position)
            owners = [self._pass_owner(node, level, parents) for node in frontier]
            logits = torch.stack([passes[owner].logits[level % self.block] for owner in owners])
            sequences = torch.cat([input_ids.expand(len(frontier), -1), input_ids.new_tensor(paths)], dim=1)
            return torch.log_softmax(self.logits_processor(sequences, logits.float()), dim=-1)

        spec = self.tree_spec
        tree = grow_tree(expand, spec, depth, device)
        self._keys, self._values = self._keys[:, :, :committed], self._values[:, :, :committed]
        return tree

    def _pass_owner(self, node: int, level: int, parents: list[int]) -> int:
        """The node whose pass drafted the children of ``node`` (at depth ``level``): its ancestor-or-self at depth
        ``k * (level // k)``, or ``-1`` (the committed block) below depth ``k``."""
        if level < self.block:
            return -1
        for _ in range(level % self.block):
            node = parents[node]
        return node

    def _commit(self, input_ids: torch.Tensor, features: torch.Tensor) -> None:
        """LSTM and keys for the newly committed rows (feature at ``t`` with token ``t + 1``), then the outputs of
        the last ``k`` committed rows (one relaxed block seeing the whole cache)."""
        rows, length = features.shape[1], input_ids.shape[1]
        first = length - 1 - rows
        positions = torch.arange(first, length - 1, device=input_ids.device)[None]
        dtype = self.draft.lm_head.weight.dtype
        embeddings = self._embed(input_ids[:1, first + 1 : length]).to(dtype)
        hidden, self._state = self.draft.recur(embeddings, features[:1].to(dtype), self._state)
        _, keys, values = self.draft.layer.project(hidden, positions)
        self._keys, self._values = torch.cat([self._keys, keys], dim=2), torch.cat([self._values, values], dim=2)
        tail = hidden if self._tail is None else torch.cat([self._tail, hidden], dim=1)
        tail_positions = positions if self._tail_positions is None else torch.cat([self._tail_positions, positions], 1)
        self._tail, self._tail_positions = tail[:, -self.block:], tail_positions[:, -self.block:]
        if self._tail.shape[1] < self.block:
            self._root_pass = None
            return
        layer = self.draft.layer
        q, _, _ = layer.project(self._tail, self._tail_positions)
        everything = torch.ones(self.block, self._keys.shape[2], dtype=torch.bool, device=input_ids.device)
        outputs = layer.finish(self._tail, layer.attend(q, self._keys, self._values, everything))[0]
        self._root_pass = _Pass(outputs, self.draft.to_target_logits(self.draft.logits(outputs)),
                                (self._state[0][0], self._state[1][0]))

    def _run_passes(self, frontier: list[int], paths: list[list[int]], tokens: list[int], parents: list[int],
                    passes: dict[int, _Pass], committed: int, root_position: int) -> None:
        """One pass per frontier node (all at depth ``d``, a multiple of ``k``), batched: each node's block is the
        tokens at depths ``d - k + 1 .. d`` of its path with the previous pass's outputs as features."""
        k, depth, device = self.block, len(paths[0]), self._keys.device
        previous = [passes[self._pass_owner(parents[node], depth - 1, parents)] for node in frontier]
        features = torch.stack([item.outputs for item in previous])
        state = (torch.stack([item.state[0] for item in previous]), torch.stack([item.state[1] for item in previous]))
        block_tokens = torch.tensor([path[depth - k:] for path in paths], device=device)
        embeddings = self._embed(block_tokens).to(features.dtype)
        hidden, (last_h, last_c) = self.draft.recur(embeddings, features, state)
        positions = root_position - 1 + torch.arange(depth - k + 1, depth + 1, device=device)
        layer = self.draft.layer
        flat = hidden.reshape(1, len(frontier) * k, -1)
        q, keys, values = layer.project(flat, positions.repeat(len(frontier))[None])
        past = self._keys.shape[2]
        allowed = self._pass_mask(frontier, parents, passes, committed, past, depth)
        self._keys, self._values = torch.cat([self._keys, keys], dim=2), torch.cat([self._values, values], dim=2)
        outputs = layer.finish(flat, layer.attend(q, self._keys, self._values, allowed.to(device)))
        outputs = outputs.view(len(frontier), k, -1)
        logits = self.draft.to_target_logits(self.draft.logits(outputs))
        for index, node in enumerate(frontier):
            passes[node] = _Pass(outputs[index], logits[index], (last_h[index], last_c[index]),
                                 first_row=past + index * k)

    def _pass_mask(self, frontier, parents, passes, committed: int, past: int, depth: int) -> torch.Tensor:
        """``(F * k, past + F * k)``: a block sees the committed prefix, its ancestors' blocks and itself."""
        k = self.block
        allowed = torch.zeros(len(frontier) * k, past + len(frontier) * k, dtype=torch.bool)
        allowed[:, :committed] = True
        for index, node in enumerate(frontier):
            rows = slice(index * k, (index + 1) * k)
            allowed[rows, past + index * k : past + (index + 1) * k] = True
            ancestor, level = node, depth
            while level > k:  # the passes that drafted this node's path
                ancestor = self._pass_owner(parents[ancestor], level - 1, parents)
                level -= k
                first = passes[ancestor].first_row
                allowed[rows, first : first + k] = True
        return allowed

    def __repr__(self) -> str:
        spec = self.default_tree_spec
        return (f"FalconDrafter(k={self.block}, tree={spec.shape!r}, depth={spec.depth}, top_k={spec.top_k}, "
                f"budget={spec.budget})")
