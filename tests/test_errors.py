"""Unsupported requests fail loudly, with a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, StaticCache

import hf_spec
from hf_spec import UnsupportedError
from tests.conftest import tiny_model, tiny_prompt


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


def generate(model, prompt=None, **kwargs):
    prompt = tiny_prompt(0) if prompt is None else prompt
    kwargs.setdefault("assistant_model", hf_spec.PromptLookupDrafter())
    kwargs.setdefault("max_new_tokens", 5)
    return model.generate(prompt, do_sample=False, **kwargs)


def test_batch_larger_than_one(target):
    with pytest.raises(UnsupportedError, match="one sequence at a time"):
        generate(target, torch.cat([tiny_prompt(0), tiny_prompt(1)]))


def test_static_cache(target):
    with pytest.raises(UnsupportedError, match="DynamicCache"):
        generate(target, cache_implementation="static")
    cache = StaticCache(config=target.config, max_cache_len=64)
    with pytest.raises(UnsupportedError, match="DynamicCache"):
        generate(target, past_key_values=cache)


def test_vocabulary_mismatch(target):
    draft = tiny_model("llama", vocab_size=128)
    with pytest.raises(UnsupportedError, match="vocabulary"):
        generate(target, assistant_model=hf_spec.DraftModelDrafter(draft))


def test_unvalidated_architecture():
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(UnsupportedError, match="allow_model_type"):
        generate(model, torch.tensor([[1, 2, 3]]))


def test_beam_search_and_multiple_returns(target):
    with pytest.raises(UnsupportedError, match="beam"):
        generate(target, num_beams=2)
    with pytest.raises(UnsupportedError, match="num_return_sequences"):
        target.generate(tiny_prompt(0), max_new_tokens=3, do_sample=True, num_return_sequences=2,
                        assistant_model=hf_spec.PromptLookupDrafter())


def test_attention_and_hidden_state_outputs(target):
    with pytest.raises(UnsupportedError, match="attentions"):
        generate(target, return_dict_in_generate=True, output_attentions=True)


def test_padded_attention_mask(target):
    prompt = tiny_prompt(0)
    mask = torch.ones_like(prompt)
    mask[0, 0] = 0
    with pytest.raises(UnsupportedError, match="padded"):
        generate(target, prompt, attention_mask=mask)


def test_greedy_verification_under_sampling_is_refused(target):
    with pytest.raises(UnsupportedError, match="distribution"):
        target.generate(tiny_prompt(0), max_new_tokens=3, do_sample=True, verification="greedy",
                        assistant_model=hf_spec.PromptLookupDrafter())


def test_unknown_verification(target):
    with pytest.raises(UnsupportedError, match="Unknown verification"):
        generate(target, verification="magic")


def test_drafter_and_custom_generate_together(target):
    with pytest.raises(UnsupportedError, match="not both"):
        generate(target, custom_generate=hf_spec.speculative_generate)


def test_custom_generate_without_drafter(target):
    with pytest.raises(UnsupportedError, match="drafter="):
        target.generate(tiny_prompt(0), max_new_tokens=3, custom_generate=hf_spec.speculative_generate)


def test_bad_drafter_arguments():
    with pytest.raises(ValueError):
        hf_spec.PromptLookupDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError):
        hf_spec.DraftModelDrafter(tiny_model("llama"), schedule="sometimes")
