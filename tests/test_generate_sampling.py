"""Sampling through generate(assistant_model=...) follows the target's distribution (statistical test).

A tiny-vocabulary target makes the exact distribution of the first two generated tokens computable;
thousands of speculative generate() calls must match it (chi-square), and a verifier that accepts
every draft token must fail the same test.
"""

from __future__ import annotations

import pytest
import torch

import hf_spec
from hf_spec.engine import rules
from hf_spec.engine.rules import VerificationRule
from hf_spec.engine.verify import Verdict
from tests.conftest import tiny_model
from tests.stats_helpers import chi_square_pvalue

VOCAB = 6
SAMPLES = 1200
PROMPT = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
SAMPLING = dict(do_sample=True, temperature=0.9, max_new_tokens=2)


def exact_pair_distribution(model) -> torch.Tensor:
    """P(x1, x2) of plain sampling, from the model's processed (temperature) distributions."""
    with torch.no_grad():
        first = torch.softmax(model(PROMPT).logits[0, -1].float() / SAMPLING["temperature"], -1)
        pairs = torch.cat([PROMPT.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
        second = torch.softmax(model(pairs).logits[:, -1].float() / SAMPLING["temperature"], -1)
    return (first[:, None] * second).flatten()


def sampled_pair_counts(model, make_drafter, verification="auto") -> torch.Tensor:
    counts = torch.zeros(VOCAB * VOCAB)
    for _ in range(SAMPLES):
        out = model.generate(PROMPT, assistant_model=make_drafter(), verification=verification, **SAMPLING)
        x1, x2 = out[0, -2:].tolist()
        counts[x1 * VOCAB + x2] += 1
    return counts


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", seed=0, vocab_size=VOCAB)
    draft = tiny_model("llama", seed=7, vocab_size=VOCAB)
    # Make the draft clearly wrong so the negative control has something to expose.
    draft.get_output_embeddings().weight.data.mul_(4.0)
    return target, draft


DRAFTERS = {
    "draft-chain": lambda draft: (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=2)),
    "draft-static-tree": lambda draft: (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=2, top_k=3)),
    "draft-pair-tree": lambda draft: (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=2, top_k=2)),
    "draft-dynamic-tree": lambda draft: (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=2, tree="dynamic",
                                                                           top_k=2, tree_budget=5)),
    "lookup-tree": lambda draft: (lambda: hf_spec.PromptLookupDrafter(max_ngram=1, num_tokens=2, max_candidates=3)),
}
CASES = [("draft-chain", "rrs"), ("draft-static-tree", "rrs"), ("draft-static-tree", "rrs_without_replacement"),
         ("draft-pair-tree", "spechub"),
         ("draft-dynamic-tree", "rrs"), ("lookup-tree", "rrs")]


@pytest.mark.parametrize("name,verification", CASES)
def test_sampled_tokens_follow_target_distribution(models, name, verification):
    target, draft = models
    torch.manual_seed(1234)
    counts = sampled_pair_counts(target, DRAFTERS[name](draft), verification)
    assert chi_square_pvalue(counts, exact_pair_distribution(target)) > 1e-3


def test_negative_control_accept_everything_is_detected(models, monkeypatch):
    def accept_every_draft_token(tree, block_scores):
        probs = torch.softmax(block_scores, -1)
        path, row = [], 0
        while tree.children[row]:
            path.append(tree.children[row][0])
            row = path[-1] + 1
        return Verdict(path, int(torch.multinomial(probs[row], 1)))

    broken = VerificationRule("rrs", accept_every_draft_token, sampling=True, sibling_scheme="iid")
    monkeypatch.setitem(rules.RULES, "rrs", broken)
    target, draft = models
    torch.manual_seed(1234)
    counts = sampled_pair_counts(target, DRAFTERS["draft-chain"](draft))
    assert chi_square_pvalue(counts, exact_pair_distribution(target)) < 1e-6


def test_typical_acceptance_is_lossy_and_never_the_default(models):
    """The negative control for the one lossy rule: the same test must reject it."""
    target, draft = models
    torch.manual_seed(1234)
    counts = sampled_pair_counts(target, DRAFTERS["draft-static-tree"](draft), verification="typical")
    assert chi_square_pvalue(counts, exact_pair_distribution(target)) < 1e-6
