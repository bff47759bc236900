"""Sampling through generate(assistant_model=...) follows plain sampling's distribution (statistical test).

Setup (tests/sampling_helpers.py): an 8-token one-layer Llama whose distributions are peaked but not
degenerate (after the prompt the first token is 7 with probability 0.63, 6 with 0.24), a draft that is
the same model with perturbed weights and a sharper lm_head (right often, wrong often, overconfident),
``max_new_tokens=4`` so the first step verifies trees of depth 3, and generation kwargs with
temperature, top-k, top-p and repetition penalty. The exact joint distribution of the first three
generated tokens is computed from the processors plain ``generate()`` builds for the same kwargs;
each case draws ``SAMPLES`` speculative generate() calls and runs a chi-square test against it. Every
lossless case must pass (p > 1e-3, fixed seed), and must have both rejected at the first node and
accepted three draft tokens in one step many times (a spy on the verification rule counts it: 78-167
of the 400 calls accept a depth-3 node, depending on the case).

Negative controls: the same test with a deliberately broken engine must fail with p < 1e-6. Measured
with ``pytest -s tests/test_generate_sampling.py`` (seed 1234; the p-values are printed):

    accept every draft token (150 samples) ................. p = 0  (17 sequences of probability 0 came out;
                                                                     without them p = 5e-12)
    verifier ignores temperature (400 samples) ............. p = 1.4e-25
    stale draft_probs for without-replacement siblings (400)  p = 1.9e-17
    residual = target after a rejection (400) .............. p = 3.0e-30
    RRS verification of SpecHub drafts (400) ............... p = 7.0e-14
    typical acceptance, lossy by design (150) .............. p = 9.8e-67

The lossless cases gave p = 0.50 (chain), 0.88 (static tree, rrs), 0.91 (rrs without replacement),
0.34 (SpecHub), 0.27 (dynamic tree), 0.14 (prompt-lookup tree). The old version of this test (uniform
target, two new tokens) passed the ignore-temperature control at p = 0.82 and the stale-draft-probs
control at p = 0.039.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

import hf_spec
from tests.sampling_helpers import (
    AcceptedDepthSpy,
    accept_every_draft_token,
    exact_joint_distribution,
    joint_counts,
    lookup_friendly_prompt,
    peaked_tiny_llama,
    perturbed_copy,
    plain_logits_processors,
    residual_is_target,
    rrs_on_spechub_drafts,
    sample_generations,
    stale_without_replacement_rows,
    verify_without_temperature,
)
from tests.stats_helpers import chi_square_pvalue

VOCAB = 8
DRAFT_DEPTH = 3
TESTED_TOKENS = 3  # the joint distribution of the first three generated tokens is tested
SAMPLES = 400
GROSS_BUG_SAMPLES = 150  # accepting every draft token and typical acceptance fail far below 1e-6 with this many
SEED = 1234
PASS_P = 1e-3
FAIL_P = 1e-6
GENERATION = dict(do_sample=True, temperature=0.6, top_k=6, top_p=0.95, repetition_penalty=1.3,
                  max_new_tokens=DRAFT_DEPTH + 1)
LOOKUP_ANCHOR = [1, 2]
DRAFT_MODEL_PROMPT = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])


@dataclass
class Scenario:
    """A prompt and the exact joint distribution of the first TESTED_TOKENS tokens plain sampling gives after it."""

    prompt: torch.Tensor
    exact: torch.Tensor  # (VOCAB,) * TESTED_TOKENS


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models():
    target = peaked_tiny_llama(VOCAB)
    return target, perturbed_copy(target, relative_noise=0.2, seed=2, confidence=1.4)


def scenario(target, prompt: torch.Tensor) -> Scenario:
    processors = plain_logits_processors(target, prompt, **GENERATION)
    return Scenario(prompt, exact_joint_distribution(target, prompt, processors, TESTED_TOKENS))


@pytest.fixture(scope="module")
def scenarios(models) -> dict[str, Scenario]:
    """The draft-model drafters run after a fixed prompt; prompt lookup after one whose lookup candidates the
    target often generates (else lookup trees would hardly ever be accepted to depth 3)."""
    target, _ = models
    anchor = torch.tensor([LOOKUP_ANCHOR])
    lookup_prompt = lookup_friendly_prompt(target, plain_logits_processors(target, anchor, **GENERATION),
                                           LOOKUP_ANCHOR, length=DRAFT_DEPTH)
    return {"draft-model": scenario(target, DRAFT_MODEL_PROMPT), "lookup": scenario(target, lookup_prompt)}


DRAFTERS = {
    "draft-chain": lambda draft: hf_spec.DraftModelDrafter(draft, num_tokens=DRAFT_DEPTH),
    "draft-static-tree": lambda draft: hf_spec.DraftModelDrafter(draft, num_tokens=DRAFT_DEPTH, top_k=3),
    "draft-pair-tree": lambda draft: hf_spec.DraftModelDrafter(draft, num_tokens=DRAFT_DEPTH, top_k=2),
    "draft-dynamic-tree": lambda draft: hf_spec.DraftModelDrafter(draft, num_tokens=DRAFT_DEPTH, tree="dynamic",
                                                                   top_k=2, tree_budget=8),
    "lookup-tree": lambda draft: hf_spec.PromptLookupDrafter(max_ngram=len(LOOKUP_ANCHOR), num_tokens=DRAFT_DEPTH,
                                                             max_candidates=2),
}


def sampled_pvalue(models, scenarios, monkeypatch, drafter: str, verification: str,
                   samples: int = SAMPLES, **extra) -> tuple[float, AcceptedDepthSpy]:
    """Chi-square p-value of ``samples`` speculative generate() calls, and how deep the verifier accepted."""
    target, draft = models
    case = scenarios["lookup" if drafter.startswith("lookup") else "draft-model"]
    spy = AcceptedDepthSpy(monkeypatch, verification)
    torch.manual_seed(SEED)
    tokens = sample_generations(target, case.prompt, lambda: DRAFTERS[drafter](draft), samples,
                                verification=verification, **GENERATION, **extra)
    return chi_square_pvalue(joint_counts(tokens, VOCAB, TESTED_TOKENS), case.exact), spy


# ------------------------------------------------------------------------------------------ the setup has power
@pytest.mark.parametrize("name", ["draft-model", "lookup"])
def test_reference_depends_on_every_processor(models, scenarios, name):
    """Each generation kwarg changes the reference distribution a lot, so the test covers all of them."""
    target, _ = models
    case = scenarios[name]
    neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    for kwarg, value in neutral.items():
        processors = plain_logits_processors(target, case.prompt, **{**GENERATION, kwarg: value})
        other = exact_joint_distribution(target, case.prompt, processors, TESTED_TOKENS)
        total_variation = float((other - case.exact).abs().sum() / 2)
        assert total_variation > 0.02, (kwarg, total_variation)


@pytest.mark.parametrize("name", ["draft-model", "lookup"])
def test_target_is_peaked_but_not_degenerate(scenarios, name):
    exact = scenarios[name].exact
    assert 0.4 < float(exact.sum(dim=(1, 2)).max()) < 0.95  # the first token
    assert int((exact > 1 / SAMPLES).sum()) >= 8  # several likely sequences, not one


# ------------------------------------------------------------------------------------------ lossless cases
CASES = [
    ("draft-chain", "rrs"),
    ("draft-static-tree", "rrs"),
    ("draft-static-tree", "rrs_without_replacement"),
    ("draft-pair-tree", "spechub"),
    ("draft-dynamic-tree", "rrs"),
    ("lookup-tree", "rrs"),
]


@pytest.mark.parametrize("drafter,verification", CASES)
def test_sampled_tokens_follow_target_distribution(models, scenarios, monkeypatch, drafter, verification):
    pvalue, spy = sampled_pvalue(models, scenarios, monkeypatch, drafter, verification)
    print(f"\n{drafter} / {verification}: p = {pvalue:.3g}, "
          f"steps by accepted draft tokens {sorted(spy.counts.items())}")
    # Drafts were wrong at the first node often and right to full depth often: every part of the rule ran.
    assert spy.counts.get(0, 0) >= SAMPLES // 10
    assert spy.steps_reaching(DRAFT_DEPTH) >= SAMPLES // 10
    assert pvalue > PASS_P


def test_cost_aware_draft_length_keeps_the_distribution(models, scenarios, monkeypatch):
    """draft_length="goodput": each step's depth depends on earlier steps' (random) acceptance, never on the current
    draft, so the output still follows the target (a cheap-verification curve keeps it drafting)."""
    curve = hf_spec.CostCurve({1: 1.0, 2: 1.05, 32: 1.6})
    pvalue, spy = sampled_pvalue(models, scenarios, monkeypatch, "draft-chain", "rrs", draft_length="goodput",
                                 cost_curve=curve)
    print(f"\ngoodput / rrs: p = {pvalue:.3g}, steps by accepted draft tokens {sorted(spy.counts.items())}")
    assert spy.counts.get(0, 0) >= SAMPLES // 10 and sum(spy.counts.values()) > SAMPLES
    assert pvalue > PASS_P


# ------------------------------------------------------------------------------------------ negative controls
CONTROLS = {  # how the engine is broken (tests/sampling_helpers.py), with which drafter, rule and sample count
    "accept-everything": (accept_every_draft_token, "draft-chain", "rrs", GROSS_BUG_SAMPLES),
    "ignore-temperature": (functools.partial(verify_without_temperature, temperature=GENERATION["temperature"]),
                           "draft-chain", "rrs", SAMPLES),
    "stale-draft-probs": (stale_without_replacement_rows, "draft-static-tree", "rrs_without_replacement", SAMPLES),
    "residual-is-target": (residual_is_target, "draft-chain", "rrs", SAMPLES),
    "rrs-on-spechub-drafts": (rrs_on_spechub_drafts, "draft-pair-tree", "spechub", SAMPLES),
}


@pytest.mark.parametrize("control", list(CONTROLS))
def test_negative_control_is_detected(models, scenarios, monkeypatch, control):
    break_engine, drafter, verification, samples = CONTROLS[control]
    break_engine(monkeypatch)
    pvalue, _ = sampled_pvalue(models, scenarios, monkeypatch, drafter, verification, samples)
    print(f"\nnegative control {control}: p = {pvalue:.3g}")
    assert pvalue < FAIL_P


def test_typical_acceptance_is_lossy_and_never_the_default(models, scenarios, monkeypatch):
    """The negative control for the one lossy rule: the same test must reject it."""
    pvalue, _ = sampled_pvalue(models, scenarios, monkeypatch, "draft-static-tree", "typical", GROSS_BUG_SAMPLES)
    print(f"\ntypical acceptance: p = {pvalue:.3g}")
    assert pvalue < FAIL_P
