"""Greedy speculative decoding must reproduce plain greedy decoding token for token; check every output.

Spec-Bench (Xia et al. 2024) only compares lossless methods, so a speedup from a method that changes
the output is no speedup. Every output of a greedy run is compared with the baseline's output for the
same item in the first repetition (the baseline's own later repetitions included, which catches
nondeterminism). A mismatch is explained by the target's logit margin at the first differing token,
computed with one plain forward over the baseline's prefix: a margin near zero is a near-tie that
floating-point differences (tree attention computes with other matrix shapes) can flip; a large
margin means the method is wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .measure import Measurement
from .render import BenchItem

NEAR_TIE = 1e-3  # logit margin below which a flip can come from floating-point rounding alone


@dataclass
class Mismatch:
    method: str
    item: str
    repeat: int
    position: int  # index among the new tokens
    expected_token: int
    actual_token: int | None  # None: the method stopped earlier
    margin: float | None = None  # target logit of expected minus actual token at that position

    @property
    def near_tie(self) -> bool:
        return self.margin is not None and abs(self.margin) < NEAR_TIE

    def describe(self, tokenizer=None) -> str:
        def show(token):
            if token is None:
                return "end of output"
            text = tokenizer.decode([token]) if tokenizer is not None else ""
            return f"{token} {text!r}" if text else str(token)

        verdict = ""
        if self.margin is not None:
            kind = "a near-tie that rounding can flip" if self.near_tie else "not a near-tie: the method is wrong"
            verdict = f"; target logit margin {self.margin:.3g} ({kind})"
        return (f"{self.method} differs from plain generate() on prompt {self.item} (repeat {self.repeat}) at new "
                f"token {self.position}: expected {show(self.expected_token)}, got {show(self.actual_token)}{verdict}")

    def as_dict(self) -> dict:
        return {**asdict(self), "near_tie": self.near_tie}


def first_difference(expected: list[int], actual: list[int]) -> int | None:
    """Index of the first differing token, or ``None`` if the sequences are equal."""
    for index, (left, right) in enumerate(zip(expected, actual)):
        if left != right:
            return index
    return None if len(expected) == len(actual) else min(len(expected), len(actual))


def check_identity(measurements: list[Measurement], outputs: dict[tuple, list[int]], baseline: str) -> list[Mismatch]:
    """Set ``identical`` on every measurement and return the mismatches."""
    mismatches = []
    for record in measurements:
        expected = outputs[(baseline, record.item, 0)]
        actual = outputs[(record.method, record.item, record.repeat)]
        position = first_difference(expected, actual)
        record.identical = position is None
        if position is not None:
            actual_token = actual[position] if position < len(actual) else None
            expected_token = expected[position] if position < len(expected) else None
            mismatches.append(Mismatch(record.method, record.item, record.repeat, position, expected_token,
                                       actual_token))
    return mismatches


@torch.no_grad()
def explain(mismatches: list[Mismatch], target, items: list[BenchItem], outputs: dict[tuple, list[int]],
            baseline: str) -> None:
    """Fill in each mismatch's logit margin (one target forward per distinct item and position)."""
    by_id = {item.id: item for item in items}
    logits_at: dict[tuple, torch.Tensor] = {}
    for mismatch in mismatches:
        if mismatch.expected_token is None or mismatch.actual_token is None:
            continue
        key = (mismatch.item, mismatch.position)
        if key not in logits_at:
            prefix = outputs[(baseline, mismatch.item, 0)][: mismatch.position]
            ids = torch.cat([by_id[mismatch.item].input_ids, torch.tensor([prefix], dtype=torch.long)], dim=1)
            logits_at[key] = target(input_ids=ids.to(target.device), logits_to_keep=1).logits[0, -1].float()
        logits = logits_at[key]
        mismatch.margin = float(logits[mismatch.expected_token] - logits[mismatch.actual_token])
