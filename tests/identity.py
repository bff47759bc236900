"""Greedy identity checks that tolerate nothing but a provable near-tie.

In float32 the target's logits over a tree (different matmul shapes) differ from sequential decoding
by ~1e-5, which can flip an argmax only where the top two logits are that close. A divergence is
accepted only if, at the first differing position, plain decoding's top-2 margin is below
``tie_margin``; anything else fails.
"""

from __future__ import annotations

import torch


def assert_greedy_identical(model, expected: torch.Tensor, got: torch.Tensor, tie_margin: float = 1e-3) -> None:
    if torch.equal(expected, got):
        return
    length = min(expected.shape[1], got.shape[1])
    differing = (expected[0, :length] != got[0, :length]).nonzero()
    assert differing.numel(), f"outputs differ in length only: {expected.shape} vs {got.shape}"
    first = int(differing[0])
    with torch.no_grad():
        logits = model(expected[:, :first]).logits[0, -1].float()
    top2 = logits.topk(2).values
    margin = float(top2[0] - top2[1])
    assert margin < tie_margin, (
        f"greedy outputs diverge at position {first} where the target's top-2 margin is {margin:.2e} "
        f"(not a near-tie): expected token {int(expected[0, first])}, got {int(got[0, first])}"
    )
