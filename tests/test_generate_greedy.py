"""Greedy decoding through generate(assistant_model=<hf_spec drafter>) is token-identical to plain generate()."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import hf_spec
from tests.helpers import perturbed_copy
from tests.conftest import ARCHITECTURES, tiny_model, tiny_prompt

MAX_NEW = 40


def drafter_factories(arch):
    other = tiny_model(arch, seed=1)
    return {
        "lookup-chain": lambda: hf_spec.PromptLookupDrafter(max_ngram=3, num_tokens=6),
        "lookup-tree": lambda: hf_spec.PromptLookupDrafter(max_ngram=2, num_tokens=6, max_candidates=4),
        "draft-chain": lambda: hf_spec.DraftModelDrafter(other, num_tokens=4),
        "draft-topk-tree": lambda: hf_spec.DraftModelDrafter(other, num_tokens=4, top_k=3),
        "draft-adaptive": lambda: hf_spec.DraftModelDrafter(other, num_tokens=2, schedule="heuristic",
                                                            confidence_threshold=0.05),
        "draft-dynamic-tree": lambda: hf_spec.DraftModelDrafter(other, num_tokens=4, tree="dynamic", tree_budget=16),
    }


def plain(model, prompt, **kwargs):
    return model.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, **kwargs)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("name", ["lookup-chain", "lookup-tree", "draft-chain", "draft-topk-tree", "draft-adaptive",
                                  "draft-dynamic-tree"])
def test_greedy_identity(arch, name):
    target = tiny_model(arch)
    drafter = drafter_factories(arch)[name]()
    for seed in range(2):
        prompt = tiny_prompt(seed)
        expected = plain(target, prompt)
        got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
        assert torch.equal(got, expected), f"{arch}/{name} seed {seed}"
        stats = drafter.stats
        assert stats.new_tokens == MAX_NEW
        assert stats.target_forwards == MAX_NEW - stats.accepted_tokens


def test_repetitive_prompt_is_accepted_by_lookup():
    target = tiny_model("llama")
    prompt = torch.tensor([[5, 6, 7, 8, 9] * 6])
    drafter = hf_spec.PromptLookupDrafter()
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, plain(target, prompt))
    assert drafter.stats.drafted_tokens > 0


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_draft_equal_to_target_accepts_everything(arch):
    target = tiny_model(arch)
    drafter = hf_spec.DraftModelDrafter(tiny_model(arch), num_tokens=4, top_k=2)
    prompt = tiny_prompt(3)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter,
                          draft_length="fixed")  # the drafter's own length (goodput: tests/test_goodput.py)
    assert torch.equal(got, plain(target, prompt))
    assert drafter.stats.accepted_tokens == MAX_NEW - drafter.stats.target_forwards
    assert drafter.stats.mean_accepted_tokens == 5.0  # 4 drafted + 1 bonus every step


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_adversarial_draft_accepts_nothing(arch):
    """A draft whose argmax is the target's argmin is never right, yet the output stays identical."""
    target = tiny_model(arch)
    anti = tiny_model(arch)
    anti.get_output_embeddings().weight.data.neg_()
    if anti.config.tie_word_embeddings:
        pytest.skip("tied embeddings: negating lm_head would also negate the input embeddings")
    drafter = hf_spec.DraftModelDrafter(anti, num_tokens=4)
    prompt = tiny_prompt(4)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, plain(target, prompt))
    assert drafter.stats.accepted_tokens == 0
    assert drafter.stats.target_forwards == MAX_NEW


def test_adversarial_draft_tied_embeddings():
    """Same extreme for a tied-embedding model (Gemma-style): a separate anti lm_head."""
    target = tiny_model("gemma3")
    anti = tiny_model("gemma3", tie_word_embeddings=False)
    anti.lm_head.weight.data = -target.get_input_embeddings().weight.data.clone()
    anti.model.load_state_dict(target.model.state_dict())
    drafter = hf_spec.DraftModelDrafter(anti, num_tokens=3)
    prompt = tiny_prompt(5)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, plain(target, prompt))
    assert drafter.stats.accepted_tokens == 0


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_dynamic_tree_from_generate_kwargs(arch):
    """tree="dynamic" selected in generate(); with draft == target and a budget holding every grown
    node, the greedy path is always in the tree when the top-1 path stays in each level's top-k."""
    target = tiny_model(arch)
    prompt = tiny_prompt(13)
    drafter = hf_spec.DraftModelDrafter(tiny_model(arch), num_tokens=3)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter,
                          tree="dynamic", tree_depth=3, tree_top_k=3, tree_budget=64)
    assert torch.equal(got, plain(target, prompt))
    assert drafter.stats.mean_accepted_tokens > 2.0
    assert drafter.stats.drafted_tokens > 3 * drafter.stats.target_forwards  # really a tree, not a chain


def test_tree_kwargs_are_refused_by_drafters_without_trees():
    target = tiny_model("llama")
    with pytest.raises(hf_spec.UnsupportedError, match="tree"):
        target.generate(tiny_prompt(0), max_new_tokens=4, do_sample=False,
                        assistant_model=hf_spec.PromptLookupDrafter(), tree="dynamic")
    with pytest.raises(hf_spec.UnsupportedError, match="tree="):
        target.generate(tiny_prompt(0), max_new_tokens=4, do_sample=False,
                        assistant_model=hf_spec.DraftModelDrafter(tiny_model("llama")), tree_budget=8)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_exact_length(max_new_tokens):
    target = tiny_model("llama")
    drafter = hf_spec.DraftModelDrafter(tiny_model("llama"), num_tokens=5)
    prompt = tiny_prompt(6)
    got = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False))


def test_eos_inside_an_accepted_draft_stops_there():
    target = tiny_model("llama")
    prompt = tiny_prompt(7)
    free_run = plain(target, prompt)[0, prompt.shape[1]:].tolist()
    eos = free_run[9]  # a token the target emits mid-way, inside a fully accepted draft
    expected = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    drafter = hf_spec.DraftModelDrafter(tiny_model("llama"), num_tokens=6)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, assistant_model=drafter)
    assert torch.equal(got, expected)
    assert got[0, -1].item() == eos


def test_logits_processors_act_as_in_plain_generate():
    target = tiny_model("qwen2")
    prompt = tiny_prompt(8)
    options = dict(repetition_penalty=1.3, no_repeat_ngram_size=3)
    expected = plain(target, prompt, **options)
    for drafter in (hf_spec.PromptLookupDrafter(max_candidates=3), hf_spec.DraftModelDrafter(tiny_model("qwen2"), top_k=2)):
        got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter, **options)
        assert torch.equal(got, expected)


def test_return_dict_scores_logits_and_cache_match_plain():
    target = tiny_model("llama")
    prompt = tiny_prompt(9)
    options = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True,
                   output_logits=True, repetition_penalty=1.2)
    expected = target.generate(prompt, **options)
    # A perturbed copy of the target: it speculates every step and is accepted often but not always,
    # so scores and logits come from accepted draft rows, from correction rows and from bonus rows.
    drafter = hf_spec.DraftModelDrafter(perturbed_copy(target, 0.2), num_tokens=3, top_k=2)
    got = target.generate(prompt, assistant_model=drafter, **options)
    stats = drafter.stats
    assert stats.drafted_tokens >= 3 * stats.target_forwards and 0 < stats.accepted_tokens < stats.new_tokens
    assert stats.target_forwards < stats.new_tokens  # some steps emitted several tokens
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == 12
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(got.logits, expected.logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert got.past_key_values.get_seq_length() == expected.past_key_values.get_seq_length()
    for ours, theirs in zip(got.past_key_values.layers, expected.past_key_values.layers):
        torch.testing.assert_close(ours.keys, theirs.keys)
        torch.testing.assert_close(ours.values, theirs.values)


class Collector(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamer_sees_the_same_tokens_as_plain_generate():
    target = tiny_model("llama")
    prompt = tiny_prompt(10)
    theirs, ours = Collector(), Collector()
    plain(target, prompt, streamer=theirs)
    target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, streamer=ours,
                    assistant_model=hf_spec.DraftModelDrafter(tiny_model("llama"), num_tokens=3))
    assert ours.chunks == theirs.chunks
    assert ours.ended and theirs.ended


def test_custom_generate_callable_entry_point():
    target = tiny_model("llama")
    prompt = tiny_prompt(11)
    drafter = hf_spec.PromptLookupDrafter()
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False,
                          custom_generate=hf_spec.speculative_generate, drafter=drafter)
    assert torch.equal(got, plain(target, prompt))
    assert drafter.stats.new_tokens == MAX_NEW


def test_pretrained_assistant_model_keeps_transformers_behaviour(monkeypatch):
    import hf_spec.integration

    def must_not_run(*args, **kwargs):
        raise AssertionError("hf_spec loop used for a PreTrainedModel assistant")

    monkeypatch.setattr(hf_spec.integration, "speculative_generate", must_not_run)
    target = tiny_model("llama")
    prompt = tiny_prompt(12)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=tiny_model("llama", seed=1))
    assert torch.equal(got, plain(target, prompt))
