"""Drawing several draft tokens for one tree node, in the way the chosen verification rule expects.

Each scheme returns the tokens and, for each, the distribution it was drawn from given the siblings
drawn before it: exactly what ``DraftTree.draft_probs`` must hold for lossless verification.

- ``"iid"``: independent samples (recursive rejection sampling with replacement; SpecInfer).
- ``"without_replacement"``: sequential sampling without replacement, each draw from the
  renormalised remainder (Recursive Speculative Decoding, Jeon et al. 2024).
- ``"spechub"``: SpecHub's hub pair (Sun et al. 2024): two drafts, one of them the draft's top token.
- ``"top_k"``: the k most likely tokens, deterministic (``None`` rows = point masses); used for greedy
  decoding and by drafters that pick candidates instead of sampling them.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedError
from .spechub import draw_hub_pair

SCHEMES = ("iid", "without_replacement", "spechub", "top_k")


def draw_siblings(probs: torch.Tensor, count: int, scheme: str) -> tuple[list[int], list[torch.Tensor | None]]:
    """``count`` draft tokens from ``probs`` (a 1-D distribution) and the distribution each came from."""
    if scheme == "top_k":
        return probs.topk(count).indices.tolist(), [None] * count
    if scheme == "iid":
        return torch.multinomial(probs, count, replacement=True).tolist(), [probs] * count
    if scheme == "without_replacement":
        return _without_replacement(probs, count)
    if scheme == "spechub":
        if count > 2:
            raise UnsupportedError(
                f"SpecHub is defined for two drafts per node, {count} were asked for; use verification='rrs' or "
                "'rrs_without_replacement' for wider trees, or top_k=2."
            )
        return draw_hub_pair(probs) if count == 2 else draw_siblings(probs, 1, "iid")
    raise ValueError(f"Unknown sibling scheme {scheme!r}; choose one of {SCHEMES}.")


def _without_replacement(probs: torch.Tensor, count: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    remaining = probs
    for _ in range(min(count, int((probs > 0).sum()))):
        token = int(torch.multinomial(remaining, 1))
        tokens.append(token)
        rows.append(remaining)
        remaining = remaining.clone()
        remaining[token] = 0
        total = remaining.sum()
        if total <= 0:
            break
        remaining = remaining / total
    return tokens, rows
