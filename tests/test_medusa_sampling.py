"""Sampling with MedusaDrafter follows plain sampling's distribution exactly (statistical test, negative controls).

Setup (tests/sampling_helpers.py): an 8-token one-layer Llama with peaked distributions, three Medusa heads
fitted in a few hundred optimiser steps to the target's own samples and then made overconfident (right
often, wrong often), a binary rank tree of depth 3 (14 nodes), ``max_new_tokens=4`` and generation kwargs
with temperature, top-k, top-p and repetition penalty. The joint distribution of the first three generated
tokens over ``SAMPLES`` speculative generate() calls is compared (chi-square) with the exact one computed
from plain generate()'s own logits processors, for deterministic top-k proposals (point masses) and for
sampled proposals (``draft_probs``) under every sibling scheme. A spy on the verification rule checks that
depth-3 nodes were accepted many times (110-160 of the 400 calls, depending on the case).

Negative controls must fail the same test with p < 1e-6. Measured with ``pytest -s`` (SAMPLES = 400,
seed 1234; the p-values are printed):

    accept every draft token ............................... p = 0  (246 sequences of probability 0 came out;
                                                                     without them p = 2.5e-12)
    verifier ignores temperature ........................... p = 9.9e-26
    stale draft_probs for without-replacement siblings ..... p = 1.1e-10
    residual = target after a rejection .................... p = 1.8e-24
    RRS verification of SpecHub drafts ..................... p = 5.0e-16

The lossless cases gave p = 0.40 (top-k proposals), 0.68 (sampled, rrs), 0.10 (rrs without replacement),
0.18 (SpecHub).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch.nn import functional as F

from hf_spec.drafters.medusa import MedusaDrafter, MedusaHeads
from tests.sampling_helpers import (
    AcceptedDepthSpy,
    accept_every_draft_token,
    exact_joint_distribution,
    joint_counts,
    peaked_tiny_llama,
    plain_logits_processors,
    residual_is_target,
    rrs_on_spechub_drafts,
    sample_generations,
    stale_without_replacement_rows,
    verify_without_temperature,
)
from tests.stats_helpers import chi_square_pvalue

VOCAB = 8
NUM_HEADS = 3
TESTED_TOKENS = 3
SAMPLES = 400
SEED = 1234
PASS_P = 1e-3
FAIL_P = 1e-6
PROMPT = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])
GENERATION = dict(do_sample=True, temperature=0.6, top_k=6, top_p=0.95, repetition_penalty=1.3,
                  max_new_tokens=NUM_HEADS + 1)
# Every rank path with ranks 0 and 1 down to depth 3: two candidates below every node.
TREE = [path for depth in range(1, NUM_HEADS + 1) for path in itertools.product((0, 1), repeat=depth)]


pytestmark = pytest.mark.usefixtures("single_thread")


def fitted_heads(target, steps: int = 300, sequences: int = 128, length: int = 12,
                 confidence: float = 1.0) -> MedusaHeads:
    """Medusa-1 in miniature: heads trained on the frozen target's own samples after ``PROMPT`` (with GENERATION).

    Head ``k`` learns to predict the token ``k + 2`` positions ahead from the target's last hidden
    state (cross-entropy, Adam), as in Cai et al. 2024, "Medusa". ``confidence`` then scales the heads'
    projections (above 1: overconfident heads). Heads that are right often and wrong often are what the
    verification rules must be tested with.
    """
    torch.manual_seed(0)
    with torch.no_grad():
        ids = target.generate(PROMPT.expand(sequences, -1), attention_mask=torch.ones(sequences, PROMPT.shape[1]),
                              **{**GENERATION, "max_new_tokens": length})
        hidden = target.model(ids).last_hidden_state  # after the final norm, what Medusa heads read
    heads = MedusaHeads.for_target(target, num_heads=NUM_HEADS, share_lm_head=False)
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.03)
    for _ in range(steps):
        loss = sum(F.cross_entropy(heads.head_logits(k, hidden[:, : -(k + 2)]).flatten(0, 1),
                                   ids[:, k + 2 :].flatten())
                   for k in range(NUM_HEADS))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for head in heads.heads:
            head.projection.weight.mul_(confidence)
    return heads.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def setup():
    target = peaked_tiny_llama(VOCAB)
    processors = plain_logits_processors(target, PROMPT, **GENERATION)
    exact = exact_joint_distribution(target, PROMPT, processors, TESTED_TOKENS)
    return target, fitted_heads(target, confidence=1.5), exact


def sampled_pvalue(setup, monkeypatch, proposal: str, verification: str) -> tuple[float, AcceptedDepthSpy]:
    target, heads, exact = setup
    spy = AcceptedDepthSpy(monkeypatch, verification)
    torch.manual_seed(SEED)
    tokens = sample_generations(target, PROMPT, lambda: MedusaDrafter(heads, rank_paths=TREE, proposal=proposal), SAMPLES,
                                verification=verification, **GENERATION)
    return chi_square_pvalue(joint_counts(tokens, VOCAB, TESTED_TOKENS), exact), spy


def test_target_is_peaked_but_not_degenerate(setup):
    first = setup[2].sum(dim=(1, 2))
    assert 0.4 < float(first.max()) < 0.95
    assert int((setup[2] > 1 / SAMPLES).sum()) >= 8


CASES = [("topk", "rrs"), ("sample", "rrs"), ("sample", "rrs_without_replacement"), ("sample", "spechub")]


@pytest.mark.parametrize("proposal,verification", CASES)
def test_sampled_tokens_follow_target_distribution(setup, monkeypatch, proposal, verification):
    pvalue, spy = sampled_pvalue(setup, monkeypatch, proposal, verification)
    print(f"\nmedusa {proposal} / {verification}: p = {pvalue:.3g}, "
          f"steps by accepted draft tokens {sorted(spy.counts.items())}")
    assert spy.counts.get(0, 0) >= SAMPLES // 10  # the heads are wrong often ...
    assert spy.steps_reaching(NUM_HEADS) >= SAMPLES // 10  # ... and right down to depth 3 often
    assert pvalue > PASS_P


CONTROLS = {  # how the engine is broken (tests/sampling_helpers.py), with which proposal and rule it is run
    "accept-everything": (accept_every_draft_token, "sample", "rrs"),
    "ignore-temperature": (functools.partial(verify_without_temperature, temperature=GENERATION["temperature"]),
                           "sample", "rrs"),
    "stale-draft-probs": (stale_without_replacement_rows, "sample", "rrs_without_replacement"),
    "residual-is-target": (residual_is_target, "sample", "rrs"),
    "rrs-on-spechub-drafts": (rrs_on_spechub_drafts, "sample", "spechub"),
}


@pytest.mark.parametrize("control", list(CONTROLS))
def test_negative_control_is_detected(setup, monkeypatch, control):
    break_engine, proposal, verification = CONTROLS[control]
    break_engine(monkeypatch)
    pvalue, _ = sampled_pvalue(setup, monkeypatch, proposal, verification)
    print(f"\nmedusa negative control {control}: p = {pvalue:.3g}")
    assert pvalue < FAIL_P
