"""The draft tree: the one data type shared by drafters and the verification engine.

A draft tree hangs below the *root*, the last committed token (the one the target has not yet run
on). Node ``i`` holds a draft token, the index of its parent (``-1`` for the root) and, when the
drafter sampled it, the distribution it was sampled from. A chain is a tree where each node has one
child; a multi-draft proposal is a tree whose nodes have several children.

Verification works on *block rows*: row 0 is the root and row ``i + 1`` is node ``i``; the target
runs once over all block rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True, eq=False)
class DraftTree:
    """Draft tokens arranged as a tree below the last committed token.

    Attributes:
        tokens: ``(n,)`` draft token ids.
        parents: ``(n,)`` parent node index of each node, ``-1`` for children of the root. Parents
            come before their children (``parents[i] < i``).
        draft_probs: ``(n, vocab)`` distribution each node's token was sampled from, given its
            ancestors and its earlier siblings (for sampling without replacement that is the
            renormalised remainder). ``None`` means every token was proposed deterministically
            (greedy drafting, n-gram lookup): verification then treats each as a point mass.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens.dim() != 1 or self.parents.shape != self.tokens.shape:
            raise ValueError(
                f"DraftTree needs 1-D tokens and parents of equal length, got {tuple(self.tokens.shape)} "
                f"and {tuple(self.parents.shape)}."
            )
        if self.tokens.dtype != torch.long or self.parents.dtype != torch.long:
            raise ValueError(f"DraftTree tokens and parents must be torch.long, got {self.tokens.dtype} and {self.parents.dtype}.")
        parent_list = self.parents.tolist()
        for index, parent in enumerate(parent_list):
            if not -1 <= parent < index:
                raise ValueError(
                    f"DraftTree node {index} has parent {parent}; parents must precede their children "
                    "(-1 for the root)."
                )
        if self.draft_probs is not None and (
            self.draft_probs.dim() != 2 or self.draft_probs.shape[0] != self.tokens.shape[0]
        ):
            raise ValueError(
                f"draft_probs must have shape (num_nodes, vocab), got {tuple(self.draft_probs.shape)} "
                f"for {self.num_nodes} nodes."
            )

    # ----------------------------------------------------------------- construction
    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> DraftTree:
        """No draft at all: the step degenerates to one plain decoding step."""
        nothing = torch.empty(0, dtype=torch.long, device=device)
        return cls(nothing, nothing.clone())

    @classmethod
    def chain(cls, tokens: torch.Tensor, draft_probs: torch.Tensor | None = None) -> DraftTree:
        """A single draft sequence, each token the child of the previous one."""
        parents = torch.arange(-1, tokens.shape[0] - 1, device=tokens.device)
        return cls(tokens.long(), parents, draft_probs)

    @classmethod
    def from_sequences(cls, sequences: list[list[int]], device: torch.device | str = "cpu") -> DraftTree:
        """Merge deterministic candidate continuations into a prefix tree (shared prefixes share nodes)."""
        tokens: list[int] = []
        parents: list[int] = []
        node_of_prefix: dict[tuple[int, ...], int] = {}
        for sequence in sequences:
            parent = -1
            for depth in range(len(sequence)):
                prefix = tuple(sequence[: depth + 1])
                if prefix not in node_of_prefix:
                    node_of_prefix[prefix] = len(tokens)
                    tokens.append(sequence[depth])
                    parents.append(parent)
                parent = node_of_prefix[prefix]
        return cls(
            torch.tensor(tokens, dtype=torch.long, device=device),
            torch.tensor(parents, dtype=torch.long, device=device),
        )

    def truncated(self, num_nodes: int) -> DraftTree:
        """The first ``num_nodes`` nodes: still a tree, since parents precede their children."""
        if num_nodes < 0:
            raise ValueError(f"num_nodes must be >= 0, got {num_nodes}.")
        probs = None if self.draft_probs is None else self.draft_probs[:num_nodes]
        return DraftTree(self.tokens[:num_nodes], self.parents[:num_nodes], probs)

    # ----------------------------------------------------------------- structure
    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[0]

    @cached_property
    def token_list(self) -> list[int]:
        return self.tokens.tolist()

    @cached_property
    def parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def is_chain(self) -> bool:
        return all(parent == index - 1 for index, parent in enumerate(self.parent_list))

    @cached_property
    def depths(self) -> list[int]:
        """Depth of each node; children of the root have depth 1."""
        depths: list[int] = []
        for parent in self.parent_list:
            depths.append(1 if parent < 0 else depths[parent] + 1)
        return depths

    @cached_property
    def children(self) -> list[list[int]]:
        """Children (node indices, in proposal order) of each block row: row 0 is the root."""
        children: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for index, parent in enumerate(self.parent_list):
            children[parent + 1].append(index)
        return children

    @cached_property
    def paths(self) -> list[list[int]]:
        """Draft tokens from the root (exclusive) to each block row (inclusive); row 0 is ``[]``."""
        paths: list[list[int]] = [[]]
        for token, parent in zip(self.token_list, self.parent_list):
            paths.append(paths[parent + 1] + [token])
        return paths

    def block_position_offsets(self) -> torch.Tensor:
        """``(n + 1,)`` offset of each block row's position from the root's position (its depth)."""
        return torch.tensor([0] + self.depths, dtype=torch.long, device=self.tokens.device)

    def block_ancestry(self) -> torch.Tensor:
        """``(n + 1, n + 1)`` bool matrix: row ``r`` may attend to block row ``c`` (its ancestors and itself)."""
        size = self.num_nodes + 1
        ancestry = torch.eye(size, dtype=torch.bool)
        ancestry[:, 0] = True
        for index, parent in enumerate(self.parent_list):
            ancestry[index + 1] |= ancestry[parent + 1]
        return ancestry.to(self.tokens.device)
