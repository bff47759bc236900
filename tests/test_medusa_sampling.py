"""Sampling with MedusaDrafter follows the target's distribution exactly (statistical test, negative control).

A 4-token vocabulary makes the exact joint distribution of the first three sampled tokens computable.
Three tokens reach depth 2 of the Medusa tree (a draft accepted below an accepted draft), where head 1's
proposals are verified after head 0's. Thousands of speculative generate() calls must match that
distribution (chi-square, tests/stats_helpers.py), for deterministic top-k proposals (point masses) and
for sampled proposals (draft_probs), while a verifier that accepts every draft token must fail it.
"""

from __future__ import annotations

import pytest
import torch

from hf_spec.drafters.medusa import MedusaDrafter, MedusaHeads
from hf_spec.engine import rules
from hf_spec.engine.rules import VerificationRule
from hf_spec.engine.verify import Verdict
from tests.conftest import tiny_model
from tests.stats_helpers import chi_square_pvalue

VOCAB = 4
SAMPLES = 800
NEW = 3
PROMPT = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
SAMPLING = dict(do_sample=True, temperature=0.9, max_new_tokens=NEW)
TREE = [[0], [1], [0, 0], [0, 1], [1, 0]]


def exact_triple_distribution(model) -> torch.Tensor:
    """P(x1, x2, x3) of plain sampling, from the model's temperature-processed distributions."""
    temperature = SAMPLING["temperature"]
    with torch.no_grad():
        first = torch.softmax(model(PROMPT).logits[0, -1].float() / temperature, -1)
        ones = torch.cat([PROMPT.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
        second = torch.softmax(model(ones).logits[:, -1].float() / temperature, -1)
        twos = torch.cat([ones.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(VOCAB)[:, None]], dim=1)
        third = torch.softmax(model(twos).logits[:, -1].float() / temperature, -1).view(VOCAB, VOCAB, VOCAB)
    return (first[:, None, None] * second[:, :, None] * third).flatten()


def sampled_triple_counts(model, drafter, verification="auto") -> tuple[torch.Tensor, int]:
    """Counts of each sampled triple, and how many draft tokens were accepted over all calls."""
    counts = torch.zeros(VOCAB**NEW)
    accepted = 0
    for _ in range(SAMPLES):
        out = model.generate(PROMPT, assistant_model=drafter, verification=verification, **SAMPLING)
        x1, x2, x3 = out[0, -NEW:].tolist()
        counts[(x1 * VOCAB + x2) * VOCAB + x3] += 1
        accepted += drafter.stats.accepted_tokens
    return counts, accepted


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Thousands of tiny forwards: one thread avoids thread-pool overhead that dominates on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    target = tiny_model("llama", seed=0, vocab_size=VOCAB)
    heads = MedusaHeads.for_target(target, num_heads=2, share_lm_head=False)
    torch.manual_seed(3)
    with torch.no_grad():  # clearly wrong but confident heads, so mistakes in verification would show
        for head in heads.heads:
            head.projection.weight.copy_(torch.randn_like(head.projection.weight) * 3)
            head.blocks[0].linear.weight.normal_(0, 0.5)
    return target, heads, exact_triple_distribution(target)


CASES = [("topk", "rrs"), ("sample", "rrs"), ("sample", "rrs_without_replacement"), ("sample", "spechub")]


@pytest.mark.parametrize("proposal,verification", CASES)
def test_sampled_tokens_follow_target_distribution(setup, proposal, verification):
    target, heads, exact = setup
    drafter = MedusaDrafter(heads, tree=TREE, proposal=proposal)
    torch.manual_seed(1234)
    counts, accepted = sampled_triple_counts(target, drafter, verification)
    assert accepted > SAMPLES // 4  # the tree was really used
    assert chi_square_pvalue(counts, exact) > 1e-3


def test_negative_control_accept_everything_is_detected(setup, monkeypatch):
    def accept_every_draft_token(tree, block_scores):
        probs = torch.softmax(block_scores, -1)
        path, row = [], 0
        while tree.children[row]:
            path.append(tree.children[row][0])
            row = path[-1] + 1
        return Verdict(path, int(torch.multinomial(probs[row], 1)))

    monkeypatch.setitem(rules.RULES, "rrs", VerificationRule("rrs", accept_every_draft_token, sampling=True,
                                                              sibling_scheme="iid"))
    target, heads, exact = setup
    torch.manual_seed(1234)
    counts, _ = sampled_triple_counts(target, MedusaDrafter(heads, tree=TREE, proposal="sample"))
    assert chi_square_pvalue(counts, exact) < 1e-6
