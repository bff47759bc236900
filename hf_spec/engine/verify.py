"""Verification rules: walk the draft tree with the target's distributions.

Every rule returns the accepted path (node indices, root to leaf) and one more token from the
target: the correction after a rejection, or the bonus token after a fully accepted path.

- ``verify_greedy``: exact match with the target's argmax, so the output is token-for-token that of
  plain greedy decoding.
- ``verify_typical``: Medusa's typical acceptance (Cai et al. 2024), LOSSY: a draft token is kept
  when the target gives it probability above ``min(epsilon, delta * exp(-entropy))``. Only used when
  asked for explicitly with ``verification="typical"``.
- ``verify_rejection_sampling``: speculative sampling (Leviathan et al. 2023, "Fast Inference from
  Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
  Decoding with Speculative Sampling") generalised to trees by recursive rejection sampling over
  siblings (SpecInfer, Miao et al. 2024; "Multi-Candidate Speculative Decoding", Yang et al. 2024;
  "Recursive Speculative Decoding", Jeon et al. 2024). The emitted tokens follow the target's
  distribution exactly, whatever the draft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import DraftTree


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one draft tree."""

    accepted_nodes: list[int]
    next_token: int

    @property
    def block_rows(self) -> list[int]:
        """Block rows whose KV entries stay in the cache: the root and the accepted nodes."""
        return [0] + [node + 1 for node in self.accepted_nodes]


def verify_greedy(tree: DraftTree, target_scores: torch.Tensor) -> Verdict:
    """Follow the child whose token is the target's argmax at each row, as long as one exists."""
    target_choice = target_scores.argmax(dim=-1).tolist()
    accepted: list[int] = []
    row = 0
    while True:
        wanted = target_choice[row]
        match = next((child for child in tree.children[row] if tree.token_list[child] == wanted), None)
        if match is None:
            return Verdict(accepted, wanted)
        accepted.append(match)
        row = match + 1


def verify_rejection_sampling(tree: DraftTree, target_probs: torch.Tensor) -> Verdict:
    """Lossless sampling over a draft tree (recursive rejection sampling over siblings).

    At each row the children are tried in proposal order. Child ``x`` drawn from ``q`` is accepted
    with probability ``min(1, p(x) / q(x))``; on rejection the target distribution becomes the
    residual ``norm(max(p - q, 0))`` and the next sibling is tried against it. Deterministic
    proposals (``tree.draft_probs is None``) are point masses, for which the residual is ``p`` with
    the rejected token removed. When every child is rejected the next token is drawn from the
    residual; when a leaf is reached it is drawn from the target's distribution there.

    ``tree.draft_probs[i]`` must be the distribution node ``i`` was actually drawn from, given its
    earlier siblings: that is what makes i.i.d. drafts (recursive rejection sampling) and drafts
    without replacement (Recursive Speculative Decoding) both exact.
    """
    accepted: list[int] = []
    row = 0
    while True:
        residual = target_probs[row]
        match = None
        for child in tree.children[row]:
            token = tree.token_list[child]
            draft = None if tree.draft_probs is None else tree.draft_probs[child]
            if _accept(residual, draft, token):
                match = child
                break
            residual = _residual(residual, draft, token)
        if match is None:
            return Verdict(accepted, int(torch.multinomial(residual, 1)))
        accepted.append(match)
        row = match + 1


def _accept(target: torch.Tensor, draft: torch.Tensor | None, token: int) -> bool:
    target_mass = target[token]
    draft_mass = 1.0 if draft is None else draft[token]
    if draft_mass <= 0:
        raise ValueError(
            f"Draft token {token} has probability 0 under the distribution it was said to be sampled "
            "from: the drafter's draft_probs do not match its tokens."
        )
    return bool(torch.rand((), device=target.device) * draft_mass < target_mass)


def _residual(target: torch.Tensor, draft: torch.Tensor | None, token: int) -> torch.Tensor:
    if draft is None:
        residual = target.clone()
        residual[token] = 0
    else:
        residual = (target - draft).clamp_min(0)
    total = residual.sum()
    if total <= 0:
        # Only reachable when p <= q everywhere, i.e. p == q up to rounding: the acceptance test
        # above then passes with probability 1 - O(eps), and p itself is the correct fallback.
        return target
    return residual / total


TYPICAL_EPSILON = 0.09  # Medusa's posterior threshold
TYPICAL_DELTA = 0.3  # Medusa's entropy factor (sqrt of epsilon)


def verify_typical(tree: DraftTree, target_probs: torch.Tensor, epsilon: float = TYPICAL_EPSILON,
                   delta: float = TYPICAL_DELTA) -> Verdict:
    """Typical acceptance (lossy): keep the deepest draft path whose every token is "typical" for the target.

    A node passes when ``p(token) > min(epsilon, delta * exp(-H(p)))`` at its parent's row. The
    next token is sampled from the target at the end of the kept path.
    """
    entropy = -(target_probs * target_probs.clamp_min(1e-30).log()).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    parent_rows = tree.parents + 1
    passes = (target_probs[parent_rows, tree.tokens] > threshold[parent_rows]).tolist() if tree.num_nodes else []
    best_path: list[int] = []
    path_of: dict[int, list[int]] = {-1: []}
    for node, parent in enumerate(tree.parent_list):
        if parent in path_of and passes[node]:
            path_of[node] = path_of[parent] + [node]
            if len(path_of[node]) > len(best_path):
                best_path = path_of[node]
    row = best_path[-1] + 1 if best_path else 0
    return Verdict(best_path, int(torch.multinomial(target_probs[row], 1)))
