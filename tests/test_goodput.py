"""Cost-aware draft length (draft_length="goodput", the default): the cost curve, the acceptance estimates, the
policy's choices at the extremes, and greedy identity with plain generate() whatever depth it picks."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

import hf_spec
from hf_spec.drafters.base import Drafter
from hf_spec.engine import goodput
from hf_spec.engine.goodput import CostCurve, GoodputPolicy
from hf_spec.engine.processors import TreeLogitsProcessor
from hf_spec.engine.target import process_block_scores
from hf_spec.errors import UnsupportedError
from tests.conftest import LIBRARY_DEFAULT_DRAFT_LENGTH, tiny_model, tiny_prompt

FLAT = CostCurve({1: 1.0, 32: 1.0})
LINEAR = CostCurve({1: 1.0, 2: 2.0, 32: 32.0})  # a k-token forward costs k one-token forwards: drafting never pays


def test_cost_curve_interpolates_extrapolates_and_normalises():
    curve = CostCurve({1: 2.0, 2: 3.0, 4: 4.0})
    assert curve(1) == 1.0 and curve(2) == 1.5 and curve(3) == 1.75 and curve(4) == 2.0
    assert curve(6) == 2.5  # along the last segment
    assert CostCurve({1: 1.0, 2: 1.2, 4: 1.1})(8) == 1.1  # never below the last measured ratio
    with pytest.raises(UnsupportedError, match="k = 1"):
        CostCurve({2: 1.5, 4: 2.0})
    from_results = CostCurve.from_results({"contexts": {"128": {"ratio": {"1": 1.0, "4": 1.3}}}})
    assert from_results.ratios == {1: 1.0, 4: 1.3}


def test_acceptance_counts_only_steps_that_reached_each_depth():
    policy = GoodputPolicy(FLAT, prior_strength=0.0, memory=1.0)
    policy.record(depth=3, nodes=3, accepted=1, target_seconds=1.0, draft_seconds=0.0)  # depth 2 rejected
    policy.record(depth=2, nodes=2, accepted=2, target_seconds=1.0, draft_seconds=0.0)
    policy.record(depth=1, nodes=1, accepted=0, target_seconds=1.0, draft_seconds=0.0)
    assert policy.acceptance(1) == pytest.approx(2 / 3)
    assert policy.acceptance(2) == pytest.approx(1 / 2)
    assert policy.expected_tokens(2) == pytest.approx(1 + 2 / 3 + 2 / 3 * 1 / 2)
    assert policy.reached[2] == 0  # depth 3 was never reached with depth 2 accepted


def test_policy_drafts_deep_when_verification_is_free_and_drafts_are_accepted():
    policy = GoodputPolicy(FLAT)
    assert policy.depth_cap(10) == 10  # nothing measured yet: the drafter's own length
    for _ in range(20):
        policy.record(depth=6, nodes=6, accepted=6, target_seconds=0.05, draft_seconds=0.0)
    assert policy.depth_cap(10) == 7  # the deepest seen plus one, to find out whether deeper pays
    assert policy.depth_cap(3) == 3


def test_policy_stops_drafting_when_nothing_pays_but_probes():
    policy = GoodputPolicy(LINEAR, probe_every=4)
    for _ in range(20):
        policy.record(depth=4, nodes=4, accepted=0, target_seconds=0.25, draft_seconds=0.02)
    caps = [policy.depth_cap(10) for _ in range(8)]
    assert caps.count(0) == 6 and caps[3] > 0 and caps[7] > 0


def test_failed_probes_back_off_and_an_accepted_probe_resets_the_interval():
    policy = GoodputPolicy(LINEAR, probe_every=4, max_probe_every=16)
    for _ in range(20):
        policy.record(depth=4, nodes=4, accepted=0, target_seconds=0.25, draft_seconds=0.02)

    def steps_until_probe() -> int:
        for step in range(1, 100):
            depth = policy.depth_cap(10)
            policy.record(depth=depth, nodes=depth, accepted=0, target_seconds=0.25 * (1 + depth), draft_seconds=0.0)
            if depth:
                return step
        raise AssertionError("no probe")

    assert [steps_until_probe() for _ in range(4)] == [4, 8, 16, 16]  # doubling, capped
    policy.depth_cap(10)  # plain
    depths = []
    while not depths or not depths[-1]:
        depths.append(policy.depth_cap(10))
    policy.record(depth=depths[-1], nodes=depths[-1], accepted=1, target_seconds=0.5, draft_seconds=0.0)
    assert policy._probe_interval == 4


def test_expensive_drafts_shorten_the_draft():
    cheap, costly = GoodputPolicy(CostCurve({1: 1.0, 32: 1.5})), GoodputPolicy(CostCurve({1: 1.0, 32: 1.5}))
    for _ in range(30):
        cheap.record(depth=8, nodes=8, accepted=4, target_seconds=0.05, draft_seconds=0.0)
        costly.record(depth=8, nodes=8, accepted=4, target_seconds=0.05, draft_seconds=0.4)
    assert costly.depth_cap(16) < cheap.depth_cap(16)


def test_a_depth_no_longer_drafted_is_not_locked_out_by_a_pessimistic_prior():
    # The Qwen2.5-Coder 1.5B/0.5B pair's measured curve and costs: one free step that accepted all five levels,
    # then many depth-1 steps (all accepted). Depth 2's own evidence decays meanwhile; it must still look as good
    # as depth 1 says, so the policy drafts deeper again instead of staying at one level for the rest of the text.
    curve = CostCurve({1: 1.0, 2: 1.26, 4: 1.32, 8: 1.45, 16: 1.82})
    policy = GoodputPolicy(curve)
    policy.record(depth=5, nodes=5, accepted=5, target_seconds=0.22, draft_seconds=0.8)
    for _ in range(60):
        policy.record(depth=1, nodes=1, accepted=1, target_seconds=0.21, draft_seconds=0.09)
    assert policy.acceptance(2) > 0.9
    assert policy.depth_cap(16) >= 3


def test_the_first_steps_draft_time_is_not_taken_as_the_cost_per_level():
    policy = GoodputPolicy(FLAT)
    policy.record(depth=4, nodes=4, accepted=4, target_seconds=0.1, draft_seconds=10.0)  # includes the prefill
    assert policy.draft_seconds_per_level is None
    policy.record(depth=4, nodes=4, accepted=4, target_seconds=0.1, draft_seconds=0.4)
    assert policy.draft_seconds_per_level == pytest.approx(0.1)


def test_rows_a_drafter_appends_count_in_the_cost_of_a_step():
    """Gated-LoRA MTP appends a mask block of k rows after every block row: the step's forward covers
    (1 + depth) * (1 + k) rows, which is what the policy must price, and what a measured step is divided by."""
    curve = CostCurve({1: 1.0, 32: 4.0})
    policy = GoodputPolicy(curve)
    policy.record(depth=2, nodes=2, accepted=2, target_seconds=0.3, draft_seconds=0.0, appended=9)
    assert policy.appended_per_row == pytest.approx(3.0)
    assert policy.one_token_seconds == pytest.approx(0.3 / curve(12))
    assert policy.step_seconds(2) == pytest.approx(policy.one_token_seconds * curve(12))
    assert policy.step_seconds(4) == pytest.approx(policy.one_token_seconds * curve(20))
    steep = CostCurve({1: 1.0, 8: 1.5, 16: 6.0, 32: 12.0})  # cheap up to 8 rows, then steep
    policy, plain = GoodputPolicy(steep), GoodputPolicy(steep)
    for _ in range(20):
        plain.record(depth=6, nodes=6, accepted=5, target_seconds=0.3, draft_seconds=0.0)
        policy.record(depth=6, nodes=6, accepted=5, target_seconds=0.3, draft_seconds=0.0, appended=21)
    assert policy.depth_cap(16) < plain.depth_cap(16)


def test_a_step_that_drafts_nothing_is_priced_and_prepared_as_a_plain_step():
    """When no depth pays, the step is a one-row forward: the rows an MTP drafter appends only prepare the next
    step's drafts, so they are asked for only when the next step drafts (a positive cap, or a probe due next)."""
    curve = CostCurve({1: 1.0, 32: 8.0})
    policy = GoodputPolicy(curve, probe_every=3)
    assert policy.drafts_next_step()  # nothing measured: the first steps draft
    policy.record(depth=2, nodes=2, accepted=0, target_seconds=0.3, draft_seconds=0.0, appended=9)
    assert policy.step_seconds(0) == pytest.approx(policy.one_token_seconds * curve(1))
    assert policy.step_seconds(1) == pytest.approx(policy.one_token_seconds * curve(8))
    policy.record(depth=0, nodes=0, accepted=0, target_seconds=0.1, draft_seconds=0.0)  # a plain step
    assert policy.appended_per_row == pytest.approx(3.0)  # averaged over the steps that appended rows only
    for _ in range(10):
        policy.record(depth=2, nodes=2, accepted=0, target_seconds=0.3, draft_seconds=0.0, appended=9)
    caps, prepared = [], []
    for _ in range(6):
        caps.append(policy.depth_cap(4))
        prepared.append(policy.drafts_next_step())
    assert caps == [0, 0, 1, 0, 0, 1]  # plain steps, then a probe every third step
    assert prepared == [False, True, True, False, True, True]  # blocks the step before a probe, and in it


class TargetOracle(Drafter):
    """Drafts the target's own greedy continuation (known in advance): every draft token is accepted."""

    def __init__(self, continuation: torch.Tensor, length: int):
        super().__init__()
        self.continuation, self.length = continuation, length

    def propose(self, request):
        start = request.input_ids.shape[1]
        tokens = self.continuation[start : start + min(self.length, request.max_tokens)]
        return hf_spec.DraftTree.chain(tokens)


@pytest.mark.parametrize("curve,deep", [(FLAT, True), (LINEAR, False)])
def test_all_accepted_extreme_follows_the_cost_curve_and_stays_identical(curve, deep):
    target = tiny_model("llama")
    prompt = tiny_prompt(1)
    expected = target.generate(prompt, max_new_tokens=40, do_sample=False)
    drafter = TargetOracle(expected[0], length=6)
    got = target.generate(prompt, max_new_tokens=40, do_sample=False, assistant_model=drafter, cost_curve=curve,
                          draft_length="goodput")
    assert torch.equal(got, expected)
    stats = drafter.stats
    assert stats.accepted_tokens == stats.drafted_tokens
    if deep:
        assert stats.mean_accepted_tokens > 5
    else:  # only the first step and the probes draft
        assert stats.depth_caps.get(0, 0) > stats.target_forwards / 2


@pytest.mark.parametrize("make", [lambda target: hf_spec.PromptLookupDrafter(),
                                  lambda target: hf_spec.DraftModelDrafter(tiny_model("llama", seed=1))])
def test_measured_curve_by_default_is_greedy_identical_and_fixed_keeps_the_drafters_length(make, monkeypatch):
    monkeypatch.setattr(goodput, "DEFAULT_DRAFT_LENGTH", "goodput")  # the library's default (conftest pins "fixed")
    target = tiny_model("llama")
    prompt = tiny_prompt(1)
    expected = target.generate(prompt, max_new_tokens=24, do_sample=False)
    drafter = make(target)
    assert torch.equal(target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=drafter), expected)
    assert sum(drafter.stats.depth_caps.values()) == drafter.stats.target_forwards
    fixed = target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=drafter, draft_length="fixed")
    assert torch.equal(fixed, expected) and drafter.stats.depth_caps == {}


def test_goodput_is_the_librarys_default():
    assert LIBRARY_DEFAULT_DRAFT_LENGTH == "goodput" and goodput.DEFAULT_DRAFT_LENGTH == "fixed"  # conftest pins it


def test_bad_draft_length_options_are_refused():
    target = tiny_model("llama")
    drafter = hf_spec.PromptLookupDrafter()
    with pytest.raises(UnsupportedError, match="draft_length"):
        target.generate(tiny_prompt(1), max_new_tokens=4, assistant_model=drafter, draft_length="short")
    with pytest.raises(UnsupportedError, match="cost_curve"):
        target.generate(tiny_prompt(1), max_new_tokens=4, assistant_model=drafter, draft_length="fixed",
                        cost_curve=FLAT)


def test_processors_that_ignore_input_ids_score_all_rows_in_one_call_as_row_by_row():
    tree = hf_spec.DraftTree(torch.tensor([5, 6, 7, 8]), torch.tensor([-1, 0, -1, 1]))
    input_ids = torch.tensor([[1, 2, 3]])
    logits = torch.randn(tree.num_nodes + 1, 32, generator=torch.Generator().manual_seed(0))
    warpers = TreeLogitsProcessor(LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(5)]))
    assert warpers.ignores_input_ids
    row_by_row = torch.cat([warpers(torch.tensor([[1, 2, 3] + path]), logits[row : row + 1])
                            for row, path in enumerate(tree.paths)])
    assert torch.equal(process_block_scores(warpers, input_ids, tree, logits), row_by_row)
    with_penalty = TreeLogitsProcessor(LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3),
                                                            TemperatureLogitsWarper(0.7)]))
    assert not with_penalty.ignores_input_ids


def test_goodput_may_draft_a_draft_model_past_its_default_length_up_to_max_num_tokens():
    target = tiny_model("llama")
    prompt = tiny_prompt(1)
    expected = target.generate(prompt, max_new_tokens=40, do_sample=False)
    depths = {}
    for draft_length in ("goodput", "fixed"):
        drafter = hf_spec.DraftModelDrafter(target, num_tokens=2, max_num_tokens=6)  # the target: all accepted
        got = target.generate(prompt, max_new_tokens=40, do_sample=False, assistant_model=drafter,
                              draft_length=draft_length, cost_curve=FLAT if draft_length == "goodput" else None)
        assert torch.equal(got, expected)
        depths[draft_length] = max(int(key) for key in drafter.stats.steps_by_accepted)
    assert depths == {"goodput": 6, "fixed": 2}
