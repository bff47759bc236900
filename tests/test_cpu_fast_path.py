"""hf_spec.accelerate_for_cpu: oneDNN packed linears, the same model up to float rounding, speculative decoding
greedy-identical with it on, clear refusals, and its cost curve."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import hf_spec
from hf_spec.bench.cost import cost_curve
from hf_spec.cpu_fast_path import cpu_backend
from hf_spec.errors import UnsupportedError
from tests.conftest import tiny_model, tiny_prompt
from tests.test_eagle3 import fitted_draft

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def greedy(model, prompt, drafter=None, max_new_tokens=24):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                          do_sample=False, assistant_model=drafter)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_every_linear_is_packed_and_the_logits_agree_to_rounding(arch):
    model = tiny_model(arch, dtype=torch.float32)
    prompt = tiny_prompt(seed=1)
    with torch.no_grad():
        before = model(prompt).logits
    assert hf_spec.accelerate_for_cpu(model) is model and cpu_backend(model) == "onednn"
    assert not any(type(module) is nn.Linear for module in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, before, atol=1e-4, rtol=1e-4)


def test_speculative_decoding_with_the_fast_path_is_greedy_identical_to_plain_decoding():
    reference = tiny_model("llama", dtype=torch.float32)
    prompt = tiny_prompt(seed=2, length=8)
    expected = greedy(reference, prompt, max_new_tokens=40)
    draft = fitted_draft(tiny_model("llama", dtype=torch.float64), expected.to(torch.long))
    model = hf_spec.accelerate_for_cpu(tiny_model("llama", dtype=torch.float32))
    assert torch.equal(greedy(model, prompt, max_new_tokens=40), expected)  # plain decoding, fast path on
    drafter = hf_spec.Eagle3Drafter(draft)
    assert torch.equal(greedy(model, prompt, drafter, max_new_tokens=40), expected)
    assert drafter.stats.mean_accepted_tokens > 2.0
    assert torch.equal(greedy(model, prompt, hf_spec.PromptLookupDrafter(), 40), expected)
    early = hf_spec.DraftModelDrafter(hf_spec.accelerate_for_cpu(tiny_model("llama", dtype=torch.float32, seed=3)))
    assert torch.equal(greedy(model, prompt, early, 40), expected)


def test_refusals_and_the_gpu_no_op(caplog):
    with pytest.raises(UnsupportedError, match="float32"):
        hf_spec.accelerate_for_cpu(tiny_model("llama", dtype=torch.float64))
    with pytest.raises(ValueError, match="Unknown CPU backend"):
        hf_spec.accelerate_for_cpu(tiny_model("llama", dtype=torch.float32), backend="inductor")
    model = tiny_model("llama", dtype=torch.float32).to("meta")  # not on the CPU: left as it is, with a warning
    with caplog.at_level(logging.WARNING, logger="hf_spec.cpu_fast_path"):
        assert hf_spec.accelerate_for_cpu(model) is model
    assert "nothing changed" in caplog.text and cpu_backend(model) == "default"


def test_cost_curve_names_the_backend():
    model = tiny_model("llama", dtype=torch.float32)
    assert cost_curve(model, contexts=(8,), new_tokens=(1, 2), repeats=1)["backend"] == "default"
    hf_spec.accelerate_for_cpu(model)
    assert cost_curve(model, contexts=(8,), new_tokens=(1, 2), repeats=1)["backend"] == "onednn"


def test_medusa_heads_sharing_the_packed_lm_head_through_a_draft_vocabulary_are_greedy_identical():
    """Shared-lm_head Medusa heads with a draft vocabulary read the packed head's rows (unpacked once, cached)."""
    from hf_spec.drafters.draft_vocab import DraftVocabulary

    model = tiny_model("llama", dtype=torch.float32)
    prompt = tiny_prompt(seed=2, length=8)
    expected = greedy(model, prompt, max_new_tokens=30)
    torch.manual_seed(0)
    heads = hf_spec.MedusaHeads.for_target(model, num_heads=2, draft_vocab=DraftVocabulary(torch.arange(0, 96, 2), 96))
    hf_spec.accelerate_for_cpu(model)
    drafter = hf_spec.MedusaDrafter(heads)
    assert torch.equal(greedy(model, prompt, drafter, max_new_tokens=30), expected)


def test_bench_runs_with_the_fast_path_on_target_and_early_exit_draft(tmp_path):
    from hf_spec.bench import make_config, run_bench
    from tests.test_bench import PROMPTS, byte_tokenizer, tiny_llama

    tokenizer = byte_tokenizer()
    target = tiny_llama(len(tokenizer), dtype=torch.float32)
    config = make_config(max_new_tokens=6, repeats=1, warmup=0, threads=1, early_exit_layers=2, out=str(tmp_path),
                         progress=False, cpu_fast_path=True, methods=["plain", "DraftModelDrafter"])
    result = run_bench(config, target=target, tokenizer=tokenizer, prompts=PROMPTS)
    assert cpu_backend(target) == "onednn" and all(row["identical"] for row in result.rows)
    assert "onednn kernels" in result.table


def test_bench_times_plain_decoding_with_default_kernels_in_the_same_run(tmp_path):
    from hf_spec.bench import make_config, run_bench
    from tests.test_bench import PROMPTS, byte_tokenizer, tiny_llama

    tokenizer = byte_tokenizer()
    target = tiny_llama(len(tokenizer), dtype=torch.float32)
    config = make_config(max_new_tokens=6, repeats=1, warmup=0, threads=1, out=str(tmp_path), progress=False,
                         cpu_fast_path=True, default_kernels_baseline=True, methods=["plain", "PromptLookupDrafter"])
    result = run_bench(config, target=target, tokenizer=tokenizer, prompts=PROMPTS)
    names = [row["method"] for row in result.rows]
    assert names == ["plain", "plain_default_kernels", "PromptLookupDrafter"]
    assert result.rows[1]["overall"]["mean_accepted_tokens"] == 1.0  # its forwards are counted on the copy
    assert cpu_backend(target) == "onednn"
    with pytest.raises(ValueError, match="set cpu_fast_path too"):
        make_config(default_kernels_baseline=True)
