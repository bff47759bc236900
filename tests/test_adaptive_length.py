"""Adaptive draft length of DraftModelDrafter chains actually adapts, and stays lossless.

``confidence_threshold`` cuts a draft once the draft's probability of its own token drops below it;
``schedule="heuristic"`` is transformers' assisted-generation schedule (+2 after a fully accepted draft,
-1 otherwise). Each is checked on the draft lengths the drafter proposed, step by step.
"""

from __future__ import annotations

import torch

import hf_spec
from tests.conftest import tiny_model, tiny_prompt

MAX_NEW = 30


def proposed_lengths(target, drafter, prompt, accepted: list | None = None) -> tuple[list[int], torch.Tensor]:
    """Depth of each step's draft (and, into ``accepted``, how many of its tokens were accepted), and the ids."""
    lengths = []
    observe = drafter.observe

    def recording_observe(outcome):
        lengths.append(max(outcome.tree.depths, default=0))
        if accepted is not None:
            accepted.append(outcome.num_accepted)
        observe(outcome)

    drafter.observe = recording_observe
    out = target.generate(prompt, assistant_model=drafter, do_sample=False, max_new_tokens=MAX_NEW,
                          draft_length="fixed")
    return lengths, out


def test_confidence_threshold_cuts_drafts_and_stays_lossless():
    target, draft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    prompt = tiny_prompt(0)
    expected = target.generate(prompt, do_sample=False, max_new_tokens=MAX_NEW)
    full, out_full = proposed_lengths(target, hf_spec.DraftModelDrafter(draft, num_tokens=6), prompt)
    # a random 96-token draft is never 90% sure of anything: every draft stops after its first token
    cut, out_cut = proposed_lengths(
        target, hf_spec.DraftModelDrafter(draft, num_tokens=6, confidence_threshold=0.9), prompt)
    assert torch.equal(out_full, expected) and torch.equal(out_cut, expected)
    assert max(full[:-1]) == 6  # without a threshold, the full length (the last step may be clipped)
    assert cut and max(cut) == 1


def test_heuristic_schedule_grows_when_accepted_and_shrinks_when_rejected():
    target = tiny_model("llama", seed=0)
    prompt = tiny_prompt(1)
    expected = target.generate(prompt, do_sample=False, max_new_tokens=MAX_NEW)
    grow, out_grow = proposed_lengths(
        target, hf_spec.DraftModelDrafter(target, num_tokens=2, schedule="heuristic", max_num_tokens=8), prompt)
    assert grow[:3] == [2, 4, 6]  # the target drafting for itself: every draft accepted, +2 each step
    adversary = tiny_model("llama", seed=7)
    accepted = []
    shrink, out_shrink = proposed_lengths(
        target, hf_spec.DraftModelDrafter(adversary, num_tokens=5, schedule="heuristic"), prompt, accepted)
    assert shrink[0] == 5 and min(shrink[:-1]) == 1
    for step in range(len(shrink) - 2):  # the last step's length may be clipped by max_new_tokens
        rule = min(shrink[step] + 2, 16) if accepted[step] == shrink[step] else max(shrink[step] - 1, 1)
        assert shrink[step + 1] == rule, (step, shrink, accepted)
    assert torch.equal(out_grow, expected) and torch.equal(out_shrink, expected)
