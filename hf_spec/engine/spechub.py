"""SpecHub: lossless verification of two drafts per node through a "hub" token.

Sun, Zhou, Chen and Sun, "SpecHub: Provable Acceleration to Multi-Draft Speculative Decoding"
(EMNLP 2024). The hub ``a`` is the draft's most likely token. The two drafts always contain it:
``x1 ~ q``; if ``x1 != a`` then ``x2 = a``, else ``x2 ~ q~`` (``q`` without ``a``, renormalised).
With that sparse joint distribution the optimal-transport acceptance has a closed form: every
token ``y != a`` is emitted with mass ``min(p(y), q~(y))`` and the hub with its full mass ``p(a)``,
so one step accepts with probability ``1 - sum_{y != a} (p(y) - q~(y))+`` (RRS and RRS without
replacement accept less whenever the draft's top token carries much of ``q``, and can accept more
when it carries little: both are measured, not assumed).

Defined for exactly two drafts per node, as in the paper and its reference implementation; a node
with one draft uses standard speculative sampling, and more than two drafts are refused.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedError
from .tree import DraftTree
from .verify import Verdict, verify_rejection_sampling


def draw_hub_pair(q: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """The two drafts of one node; both rows carry ``q`` (the verifier rebuilds the pair law from it)."""
    hub = int(q.argmax())
    first = int(torch.multinomial(q, 1))
    if first != hub:
        return [first, hub], [q, q]
    without_hub = _without(q, hub)
    if without_hub is None:
        return [first], [q]
    return [first, int(torch.multinomial(without_hub, 1))], [q, q]


def verify_spechub(tree: DraftTree, target_probs: torch.Tensor) -> Verdict:
    """Walk the tree: SpecHub at two-child nodes, standard speculative sampling at one-child nodes.

    Deterministic trees (no ``draft_probs``) have no draft distribution to build a hub from; they
    are verified by recursive rejection sampling over point masses, which is equally lossless.
    """
    if tree.draft_probs is None:
        return verify_rejection_sampling(tree, target_probs)
    accepted: list[int] = []
    row = 0
    while True:
        children = tree.children[row]
        p = target_probs[row]
        if not children:
            return Verdict(accepted, int(torch.multinomial(p, 1)))
        if len(children) > 2:
            raise UnsupportedError(
                f"verification='spechub' is defined for two drafts per node, this tree has {len(children)}; "
                "use verification='rrs' or 'rrs_without_replacement' for wider trees."
            )
        choice, residual = _hub_step(p, tree.draft_probs[children[0]], [tree.token_list[c] for c in children])
        if choice is None:
            return Verdict(accepted, int(torch.multinomial(residual, 1)))
        accepted.append(children[choice])
        row = children[choice] + 1


def _hub_step(p: torch.Tensor, q: torch.Tensor, drafts: list[int]) -> tuple[int | None, torch.Tensor | None]:
    """One node: the index of the accepted draft, or ``None`` and the distribution to sample from."""
    if len(drafts) == 1:
        return _single_step(p, q, drafts[0])
    hub = int(q.argmax())
    if hub not in drafts:
        raise ValueError("SpecHub drafts must contain the draft's top token; draw them with draw_hub_pair.")
    q_without_hub = _without(q, hub)
    if q_without_hub is None:  # the draft is certain of the hub, so only a lone hub could have been drafted
        raise ValueError("SpecHub got two drafts from a draft distribution with a single token.")
    others = torch.ones_like(p, dtype=torch.bool)
    others[hub] = False
    gain = (p - q).clamp_min(0) * others  # A(y)
    hub_first = q[hub] * q_without_hub  # Q(a, y): probability of the pair (hub, y)
    spill_hub_first = ((hub_first - gain).clamp_min(0) * others).sum()  # S_ai
    spill_other_first = ((q - p).clamp_min(0) * others).sum()  # S_ia
    coin = lambda: float(torch.rand(()))  # noqa: E731 - one fresh uniform per test

    if drafts[0] == hub:
        other = drafts[1]
        if coin() * hub_first[other] < gain[other]:
            return 1, None
        if coin() * spill_hub_first < p[hub]:
            return 0, None
    else:
        other = drafts[0]
        if drafts[1] != hub:
            raise ValueError("SpecHub pairs are (x, hub) or (hub, x).")
        if coin() * q[other] < p[other]:
            return 0, None
        hub_left = (p[hub] - spill_hub_first).clamp_min(0)
        if coin() * spill_other_first < hub_left:
            return 1, None
    residual = (p - q_without_hub).clamp_min(0) * others
    total = residual.sum()
    return None, (residual / total if total > 0 else p)


def _single_step(p: torch.Tensor, q: torch.Tensor, draft: int) -> tuple[int | None, torch.Tensor | None]:
    if float(torch.rand(())) * q[draft] < p[draft]:
        return 0, None
    residual = (p - q).clamp_min(0)
    total = residual.sum()
    return None, (residual / total if total > 0 else p)


def _without(q: torch.Tensor, token: int) -> torch.Tensor | None:
    rest = q.clone()
    rest[token] = 0
    total = rest.sum()
    return rest / total if total > 0 else None
