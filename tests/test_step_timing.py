"""Where a speculative step's time goes (GenerationStats draft / target / loop overhead), and that the timing hooks
leave the model as they found it."""

from __future__ import annotations

import pytest
import torch

import hf_spec
from hf_spec.bench.measure import Measurement
from hf_spec.bench.metrics import phase_ms_per_step
from tests.conftest import tiny_model, tiny_prompt


def test_step_time_splits_into_draft_target_and_the_rest():
    target = tiny_model("llama", dtype=torch.float32)
    drafter = hf_spec.DraftModelDrafter(tiny_model("llama", dtype=torch.float32, seed=3), num_tokens=3)
    prompt = tiny_prompt(seed=1)
    target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                    assistant_model=drafter)
    stats = drafter.stats
    assert stats.draft_seconds > 0 and stats.target_seconds > 0
    assert stats.step_seconds >= stats.draft_seconds + stats.target_seconds
    assert stats.loop_overhead_seconds == pytest.approx(stats.step_seconds - stats.draft_seconds
                                                        - stats.target_seconds)
    assert "loop_overhead_seconds" in stats.as_dict()
    assert not target._forward_hooks and not target._forward_pre_hooks


class FailingDrafter(hf_spec.PromptLookupDrafter):
    def propose(self, request):
        raise RuntimeError("drafter broke")


def test_timing_hooks_are_removed_when_a_step_fails():
    target = tiny_model("llama", dtype=torch.float32)
    prompt = tiny_prompt(seed=1)
    with pytest.raises(RuntimeError, match="drafter broke"):
        target.generate(prompt, max_new_tokens=4, do_sample=False, assistant_model=FailingDrafter())
    assert not target._forward_hooks and not target._forward_pre_hooks


def test_bench_reports_milliseconds_per_target_step():
    def record(forwards, draft, target, rest):
        return Measurement("m", "g/a", "g", 0, 1.0, 10, forwards, 10 - forwards,
                           phase_seconds={"draft": draft, "target": target, "loop_overhead": rest})

    ms = phase_ms_per_step([record(4, 0.4, 0.8, 0.04), record(6, 0.2, 1.2, 0.06)])
    assert ms == pytest.approx({"draft": 60.0, "target": 200.0, "loop_overhead": 10.0})
    assert phase_ms_per_step([Measurement("t", "g/a", "g", 0, 1.0, 10, 10, 0)]) is None
