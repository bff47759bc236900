"""The real SmolLM2-135M-Instruct on two of the demo's prompts: the all-accepted extreme (the target drafting for
itself), prompt lookup accepting on an input-grounded prompt, stop strings and sampling. Every drafter's greedy
identity on 21 held-out chat prompts of 128 tokens is ``test_smollm2_heldout.py``."""

from __future__ import annotations


import pytest
import torch

import hf_spec
from hf_spec.demo import demo_prompts
from hf_spec.drafters.early_exit import early_exit_model
from tests.identity import assert_greedy_identical

pytestmark = pytest.mark.real_model
MAX_NEW = 48


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tokenizer = smollm2
    demo = demo_prompts()
    prompts = [chat(tokenizer, demo[0]), chat(tokenizer, demo[2])]
    expected = [model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False) for ids in prompts]
    return model, tokenizer, prompts, expected


def test_the_target_drafting_for_itself_is_always_accepted(setup):
    """The all-accepted extreme on a real model: every draft accepted, up to a stop, output identical."""
    model, _, prompts, expected = setup
    drafter = hf_spec.DraftModelDrafter(model, num_tokens=4)
    outcomes = []
    observe = drafter.observe
    drafter.observe = lambda outcome: (outcomes.append(outcome), observe(outcome))
    for ids, reference in zip(prompts, expected):
        got = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
        assert_greedy_identical(model, reference, got)
    assert all(o.num_accepted == o.tree.num_nodes for o in outcomes if o.next_token is not None)


def test_input_grounded_prompt_accepts_lookup_drafts(setup):
    model, _, prompts, _ = setup
    drafter = hf_spec.PromptLookupDrafter(max_ngram=3, num_tokens=8)
    model.generate(prompts[0], max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert drafter.stats.mean_accepted_tokens > 1.0


def test_stop_strings(setup):
    model, tokenizer, prompts, expected_free = setup
    prompt_length = prompts[0].shape[1]
    stop = tokenizer.decode(expected_free[0][0, prompt_length + 20 : prompt_length + 22]).strip()
    assert stop, "the free-running output should have text there"
    options = dict(max_new_tokens=MAX_NEW, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    expected = model.generate(prompts[0], **options)
    got = model.generate(prompts[0], assistant_model=hf_spec.PromptLookupDrafter(), **options)
    assert_greedy_identical(model, expected, got)
    assert expected.shape[1] <= prompt_length + 22  # the stop string did stop it


def test_sampling_runs_on_real_model(setup):
    model, tokenizer, prompts, _ = setup
    torch.manual_seed(0)
    drafter = hf_spec.DraftModelDrafter(early_exit_model(model, 8), num_tokens=3, top_k=2)
    out = model.generate(prompts[1], max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9,
                         assistant_model=drafter)
    assert out.shape[1] <= prompts[1].shape[1] + 24
    assert drafter.stats.new_tokens == out.shape[1] - prompts[1].shape[1]
    assert tokenizer.decode(out[0, prompts[1].shape[1]:]).strip()
