"""Tree shapes, and dynamic draft trees: spend a node budget where the draft is confident.

What "tree" names in hf_spec:

- *tree shape*: ``"chain"``, ``"static"`` or ``"dynamic"`` (``TREE_SHAPES``); ``tree=`` always takes one,
  as a drafter's constructor argument or as ``generate(tree=...)``.
- ``TreeSpec``: a shape with its sizes (``depth``, ``top_k``, ``budget``); ``generate(tree=..., tree_depth=...,
  tree_top_k=..., tree_budget=...)`` builds one for the call; drafters name theirs ``*_spec``, never ``tree``
  (``DraftModelDrafter.tree_spec``, ``MedusaDrafter.dynamic_spec``).
- ``DraftTree`` (``hf_spec.engine.tree``): the tokens and parent links one step drafts and the target verifies.
- *rank paths* (Medusa, ``hf_spec.drafters.medusa.rank_tree``): a static tree written as paths of head ranks,
  ``(0, 1)`` = head 1's second-best token below head 0's best; ``MedusaDrafter(rank_paths=...)``.

EAGLE-2 (Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees")
and DySpec (Xiong et al. 2024): grow the tree level by level, expanding only the ``top_k`` most
probable frontier nodes (by cumulative draft log-probability), then keep the ``budget`` best nodes
overall. Works with any drafter that can give next-token distributions for a set of tree nodes.

The tokens are a deterministic function of the context (top-k choices), so the tree carries no
``draft_probs``: verification treats them as point masses, which is lossless under sampling too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .tree import DraftTree

TREE_SHAPES = ("chain", "static", "dynamic")


@dataclass(frozen=True)
class TreeSpec:
    """The shape of draft trees a drafter builds, with its sizes.

    ``"chain"``: one token per depth. ``"static"``: the chain plus ``top_k - 1`` alternatives at each
    depth (Medusa: the accuracy-derived tree of ``budget`` nodes over ranks below ``top_k``).
    ``"dynamic"``: EAGLE-2-style growth, ``depth`` levels, ``top_k`` expansions per level, ``budget``
    nodes kept.
    """

    shape: str = "chain"
    depth: int | None = None
    top_k: int = 4
    budget: int = 32

    def __post_init__(self):
        if self.shape not in TREE_SHAPES:
            raise ValueError(f"tree must be one of {TREE_SHAPES}, got {self.shape!r}.")
        if self.top_k < 1 or self.budget < 1 or (self.depth is not None and self.depth < 1):
            raise ValueError("tree_top_k, tree_budget and tree_depth must be at least 1.")


# expand(frontier node indices (-1 = root), tokens so far, parents so far) -> (len(frontier), vocab) log-probs
Expand = Callable[[list[int], list[int], list[int]], torch.Tensor]


def grow_dynamic_tree(expand: Expand, depth: int, top_k: int, budget: int, device,
                      expand_width: int | None = None) -> DraftTree:
    """Grow a tree with ``expand`` for ``depth`` levels and keep its ``budget`` most probable nodes: each level
    expands its ``expand_width`` (default ``top_k``) most probable nodes into their ``top_k`` best children."""
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    frontier, frontier_scores = [-1], torch.zeros(1)
    for _ in range(depth):
        # a token a logits processor ruled out (-inf, or NaN where it ruled out every token) is never drafted
        log_probs = expand(frontier, tokens, parents)
        log_probs = log_probs.masked_fill(log_probs.isnan(), float("-inf"))
        top = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)  # on the drafter's device: k values leave it
        top_values, top_indices = top.values.float().cpu(), top.indices.cpu()
        candidate_scores = frontier_scores[:, None] + top_values
        first_new = len(tokens)
        for row, parent in enumerate(frontier):
            possible = torch.isfinite(candidate_scores[row])
            tokens += top_indices[row][possible].tolist()
            parents += [parent] * int(possible.sum())
            scores += candidate_scores[row][possible].tolist()
        layer = torch.tensor(scores[first_new:])
        if layer.numel() == 0:
            break
        best = layer.topk(min(expand_width or top_k, layer.numel())).indices
        frontier = [first_new + int(i) for i in best]
        frontier_scores = layer[best]
    return _keep_best(tokens, parents, scores, budget, device) if tokens else DraftTree.empty(device)


def node_path(node: int, tokens: list[int], parents: list[int]) -> list[int]:
    """The draft tokens from the root (exclusive) down to ``node`` (inclusive) of a tree being grown."""
    path = []
    while node >= 0:
        path.append(tokens[node])
        node = parents[node]
    return path[::-1]


STATIC_TOP_K = 2  # a static tree's default: the chain plus one alternative at each depth


def grown_tree_spec(tree: str, depth: int, top_k: int | None, budget: int | None, default_top_k: int,
                    default_budget: int, drafter: str) -> TreeSpec:
    """The ``TreeSpec`` of a drafter that grows trees from its own distributions level by level (EAGLE-3,
    Clover-2, Falcon): a ``"chain"``; a ``"static"`` tree, the chain plus ``top_k - 1`` alternatives at each depth
    (``depth * top_k`` nodes); or a ``"dynamic"`` one (``top_k`` expansions per level, ``budget`` nodes kept)."""
    if tree == "chain":
        return TreeSpec("chain", depth=depth, top_k=1, budget=depth)
    if tree == "static":
        width = top_k or STATIC_TOP_K
        return TreeSpec("static", depth=depth, top_k=width, budget=depth * width)
    if tree == "dynamic":
        return TreeSpec("dynamic", depth=depth, top_k=top_k or default_top_k, budget=budget or default_budget)
    raise ValueError(f"{drafter} grows trees of shape {TREE_SHAPES}, got tree={tree!r}.")


def grown_tree_for_call(requested: TreeSpec | None, default: TreeSpec, drafter: str,
                        max_depth: int | None = None) -> TreeSpec:
    """The tree such a drafter drafts for one ``generate(tree=..., tree_depth=...)`` call; ``max_depth`` caps the
    depth."""
    if requested is None:
        return default
    depth = requested.depth or default.depth
    depth = min(depth, max_depth) if max_depth else depth
    return grown_tree_spec(requested.shape, depth, requested.top_k, requested.budget, default.top_k, default.budget,
                           drafter)


def grow_tree(expand: Expand, spec: TreeSpec, depth: int, device) -> DraftTree:
    """Grow the tree ``spec`` describes, ``depth`` levels deep (a static tree expands only the chain's node)."""
    return grow_dynamic_tree(expand, depth, spec.top_k, spec.budget, device,
                             expand_width=1 if spec.shape == "static" else spec.top_k)


def tree_rows_mask(nodes: list[int], parents: list[int], cache_row: dict[int, int], past: int,
                   committed: int) -> tuple[torch.Tensor, list[int]]:
    """For a drafter with its own KV cache that runs one tree level as new rows after ``past`` cached ones (the
    first ``committed`` being the committed prefix): the ``(rows, past + rows)`` attention mask (each row sees the
    prefix, its ancestors' rows and itself) and each node's depth. Records each node's row in ``cache_row``."""
    allowed = torch.zeros(len(nodes), past + len(nodes), dtype=torch.bool)
    allowed[:, :committed] = True
    depths = []
    for row, node in enumerate(nodes):
        allowed[row, past + row] = True
        ancestor, depth = parents[node], 1
        while ancestor >= 0:
            allowed[row, cache_row[ancestor]] = True
            ancestor, depth = parents[ancestor], depth + 1
        depths.append(depth)
        cache_row[node] = past + row
    return allowed, depths


def _keep_best(tokens: list[int], parents: list[int], scores: list[float], budget: int, device) -> DraftTree:
    """The ``budget`` highest-scoring nodes; a parent never scores below its child, so ties go to the parent."""
    order = sorted(range(len(tokens)), key=lambda node: (-scores[node], node))[:budget]
    kept = sorted(order)
    new_index = {old: new for new, old in enumerate(kept)}
    new_parents = [new_index[parents[old]] if parents[old] >= 0 else -1 for old in kept]
    return DraftTree(torch.tensor([tokens[old] for old in kept], dtype=torch.long, device=device),
                     torch.tensor(new_parents, dtype=torch.long, device=device))
