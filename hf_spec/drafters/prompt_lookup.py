"""Prompt lookup decoding: draft by copying what followed the latest n-gram elsewhere in the context.

Saxena 2023, "Prompt Lookup Decoding"; in Spec-Bench as PLD. Model-free: proposals are
deterministic (point masses), so verification stays lossless under sampling too.
"""

from __future__ import annotations

import torch

from ..engine.tree import DraftTree
from .base import DraftRequest, Drafter


class PromptLookupDrafter(Drafter):
    """Find the longest recent n-gram (``max_ngram`` down to ``min_ngram`` tokens) that occurred
    earlier in the context and propose the ``num_tokens`` tokens that followed it.

    With ``max_candidates > 1`` the continuations of several distinct earlier occurrences (most
    recent first) are merged into a prefix tree and verified together in one target forward.
    """

    def __init__(self, max_ngram: int = 3, num_tokens: int = 8, min_ngram: int = 1, max_candidates: int = 1):
        super().__init__()
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"Need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}.")
        if num_tokens < 1 or max_candidates < 1:
            raise ValueError("num_tokens and max_candidates must be at least 1.")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.num_tokens = num_tokens
        self.max_candidates = max_candidates

    def propose(self, request: DraftRequest) -> DraftTree:
        ids = request.input_ids[0]
        length = min(self.num_tokens, request.max_tokens)
        if length == 0:
            return DraftTree.empty(ids.device)
        for ngram in range(min(self.max_ngram, ids.shape[0] - 1), self.min_ngram - 1, -1):
            continuations = self._continuations(ids, ngram, length)
            if continuations:
                return DraftTree.from_sequences(continuations, device=ids.device)
        return DraftTree.empty(ids.device)

    def _continuations(self, ids: torch.Tensor, ngram: int, length: int) -> list[list[int]]:
        """Distinct continuations of earlier occurrences of the last ``ngram`` tokens, most recent first."""
        windows = ids[:-1].unfold(0, ngram, 1)  # every n-gram that ends before the last token
        hits = (windows == ids[-ngram:]).all(dim=1).nonzero().flatten().flip(0).tolist()
        continuations: list[list[int]] = []
        for start in hits:
            follow = ids[start + ngram : start + ngram + length].tolist()
            if follow and follow not in continuations:
                continuations.append(follow)
                if len(continuations) == self.max_candidates:
                    break
        return continuations

    def __repr__(self) -> str:
        return (f"PromptLookupDrafter(max_ngram={self.max_ngram}, num_tokens={self.num_tokens}, "
                f"max_candidates={self.max_candidates})")
