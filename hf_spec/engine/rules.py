"""The verification rules selectable with ``generate(verification=...)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .spechub import verify_spechub
from .tree import DraftTree
from .verify import Verdict, verify_greedy, verify_rejection_sampling, verify_typical


@dataclass(frozen=True)
class VerificationRule:
    """A named verification rule, selectable with ``generate(verification=name)``.

    ``sibling_scheme`` tells drafters how to draw several candidates for one node so that the rule
    stays exact (see ``hf_spec.engine.siblings``).
    """

    name: str
    verify: Callable[[DraftTree, torch.Tensor], Verdict]  # (tree, processed scores of every block row)
    sampling: bool
    sibling_scheme: str
    lossless: bool = True


def _on_probs(rule: Callable[[DraftTree, torch.Tensor], Verdict]) -> Callable[[DraftTree, torch.Tensor], Verdict]:
    return lambda tree, scores: rule(tree, torch.softmax(scores, dim=-1))


RULES: dict[str, VerificationRule] = {
    "greedy": VerificationRule("greedy", verify_greedy, sampling=False, sibling_scheme="top_k"),
    "rrs": VerificationRule("rrs", _on_probs(verify_rejection_sampling), sampling=True, sibling_scheme="iid"),
    "rrs_without_replacement": VerificationRule(
        "rrs_without_replacement", _on_probs(verify_rejection_sampling), sampling=True,
        sibling_scheme="without_replacement"),
    "spechub": VerificationRule("spechub", _on_probs(verify_spechub), sampling=True, sibling_scheme="spechub"),
    "typical": VerificationRule("typical", _on_probs(verify_typical), sampling=True, sibling_scheme="top_k",
                                lossless=False),
}
RULES["rejection_sampling"] = RULES["rrs"]
