"""Medusa's static trees of rank paths (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework
with Multiple Decoding Heads", section on tree attention).

Node ``(r_1, ..., r_d)`` is head ``d-1``'s ``r_d``-th best token below node ``(r_1, ..., r_{d-1})``. From each
head's measured rank accuracies (probability that the target's token is the head's ``r``-th choice) the paper
picks the nodes most likely to be accepted: ``best_rank_tree`` maximises the expected accepted length for a
node budget under its independence assumption (``expected_accepted_length``). ``RankTree`` lays a set of
paths out as a ``DraftTree`` skeleton (parents before children).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

RankPath = tuple[int, ...]


def validate_rank_paths(paths: list[RankPath], num_heads: int) -> None:
    present = set(paths)
    for path in paths:
        if not path or len(path) > num_heads or min(path) < 0:
            raise ValueError(f"Medusa rank path {path} must have 1..{num_heads} non-negative ranks.")
        if len(path) > 1 and path[:-1] not in present:
            raise ValueError(f"Medusa rank path {path} lacks its parent {path[:-1]}.")
    if len(present) != len(paths):
        raise ValueError("Medusa rank paths must be distinct.")


def validate_rank_accuracies(accuracies: list[list[float]], num_heads: int) -> None:
    if len(accuracies) != num_heads or any(len(row) == 0 for row in accuracies):
        raise ValueError(f"head_rank_accuracies needs one non-empty row per head ({num_heads}).")
    for row in accuracies:
        if any(value < 0 for value in row) or sum(row) > 1 + 1e-6:
            raise ValueError("Each head_rank_accuracies row must be probabilities summing to at most 1.")


def prior_rank_accuracies(num_heads: int, num_ranks: int = 8) -> list[list[float]]:
    """A guess used only when a checkpoint carries no measured accuracies: top-1 of head ``k`` is
    ``0.6 * 0.75^k`` and each further rank half as likely as the one before."""
    return [[0.6 * 0.75**k * 0.5**r for r in range(num_ranks)] for k in range(num_heads)]


def best_rank_tree(rank_accuracies: list[list[float]], num_nodes: int) -> list[RankPath]:
    """The ``num_nodes`` rank paths most likely to be accepted, parents first.

    Under the Medusa paper's independence assumption a node ``(r_1..r_d)`` is accepted with probability
    ``prod_j a[j-1][r_j]`` and the expected accepted length is one plus the sum over the tree's nodes.
    A child is never more likely than its parent, so taking nodes in decreasing probability (best-first
    over the children of the nodes taken so far) yields a valid tree that maximises that sum.
    """
    frontier = [(-probability, (rank,)) for rank, probability in enumerate(rank_accuracies[0]) if probability > 0]
    heapq.heapify(frontier)
    chosen: list[RankPath] = []
    while frontier and len(chosen) < num_nodes:
        negative, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < len(rank_accuracies):
            for rank, probability in enumerate(rank_accuracies[len(path)]):
                if probability > 0:
                    heapq.heappush(frontier, (negative * probability, path + (rank,)))
    return sorted(chosen, key=lambda path: (len(path), path))


def expected_accepted_length(paths: list[RankPath], rank_accuracies: list[list[float]]) -> float:
    """Expected tokens per step (accepted drafts + the target's token) of a tree, under independence."""
    total = 1.0
    for path in paths:
        probability = 1.0
        for depth, rank in enumerate(path):
            row = rank_accuracies[depth]
            probability *= row[rank] if rank < len(row) else 0.0
        total += probability
    return total



def chain_paths(num_heads: int) -> list[RankPath]:
    """Top-1 of every head: a single chain of ``num_heads`` tokens."""
    return [(0,) * depth for depth in range(1, num_heads + 1)]


@dataclass(frozen=True)
class RankTree:
    """A static tree of rank paths laid out as a ``DraftTree`` skeleton (parents before children)."""

    paths: list[RankPath]
    parents: list[int] = field(init=False)
    depths: list[int] = field(init=False)
    ranks: list[int] = field(init=False)

    def __post_init__(self):
        ordered = sorted(self.paths, key=lambda path: (len(path), path))
        index_of = {path: index for index, path in enumerate(ordered)}
        object.__setattr__(self, "paths", ordered)
        object.__setattr__(self, "parents", [index_of[path[:-1]] if len(path) > 1 else -1 for path in ordered])
        object.__setattr__(self, "depths", [len(path) for path in ordered])
        object.__setattr__(self, "ranks", [path[-1] for path in ordered])

    def up_to_depth(self, max_depth: int) -> RankTree:
        return RankTree([path for path in self.paths if len(path) <= max_depth])

    def with_ranks_below(self, num_ranks: int) -> RankTree:
        """The nodes whose every rank is below ``num_ranks`` (a subtree: a node's path extends its parent's)."""
        if max(self.ranks, default=0) < num_ranks:
            return self
        return RankTree([path for path in self.paths if max(path) < num_ranks])

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)
