"""Both entry points (assistant_model= and custom_generate=) behave like plain generate(), identically.

Streamer, stop strings with the tokenizer, a positional generation_config, and every logits processor
generate() can build: each either acts exactly as in plain decoding or is refused up front.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

import hf_spec
from tests.conftest import tiny_model, tiny_prompt

MAX_NEW = 24
ENTRY_POINTS = ["assistant_model", "custom_generate"]


def speculative(model, prompt, entry_point, drafter, *args, **kwargs):
    """``model.generate`` through one of the two entry points; greedy, MAX_NEW tokens unless a config is given."""
    if not args and "generation_config" not in kwargs:
        kwargs.setdefault("max_new_tokens", MAX_NEW)
        kwargs.setdefault("do_sample", False)
    if entry_point == "assistant_model":
        return model.generate(prompt, *args, assistant_model=drafter, **kwargs)
    return model.generate(prompt, *args, custom_generate=hf_spec.speculative_generate, drafter=drafter, **kwargs)


def plain(model, prompt, *args, **kwargs):
    if not args and "generation_config" not in kwargs:
        kwargs.setdefault("max_new_tokens", MAX_NEW)
        kwargs.setdefault("do_sample", False)
    return model.generate(prompt, *args, **kwargs)


def self_draft(model, **kwargs):
    """A drafter that agrees with the target: every step speculates and accepts."""
    return hf_spec.DraftModelDrafter(model, num_tokens=3, **kwargs)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    from hf_spec.offline_models import OfflineModelError, model_path

    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_path("smollm2-135m-instruct"))
    except OfflineModelError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def text_target(tokenizer):
    """A tiny random Llama over SmolLM2's real vocabulary, so text and stop strings mean something."""
    return tiny_model("llama", vocab_size=len(tokenizer))


class Collector(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.ended = True


# ---------------------------------------------------------------------------------------------- streamer
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_streamer_receives_every_token_and_end(target, entry_point):
    prompt = tiny_prompt(10)
    theirs, ours = Collector(), Collector()
    plain(target, prompt, streamer=theirs)
    speculative(target, prompt, entry_point, self_draft(target), streamer=ours)
    assert ours.chunks == theirs.chunks
    assert ours.ended and theirs.ended


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_text_iterator_streamer_consumer_finishes(text_target, tokenizer, entry_point):
    """A TextIteratorStreamer consumer (the usual chat UI pattern) gets the text and is released by end()."""
    prompt = tiny_prompt(3, vocab=len(tokenizer))
    expected = plain(text_target, prompt)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    worker = threading.Thread(target=speculative, args=(text_target, prompt, entry_point, self_draft(text_target)),
                              kwargs=dict(streamer=streamer))
    worker.start()
    text = "".join(streamer)  # raises queue.Empty after 60 s if end() never comes
    worker.join()
    assert text == tokenizer.decode(expected[0, prompt.shape[1]:])


# ---------------------------------------------------------------------------------------------- stop strings
def stop_string_of(tokenizer, model, prompt) -> str:
    """A string the free-running model emits mid-way, inside what a self-draft accepts."""
    new = plain(model, prompt)[0, prompt.shape[1]:]
    text = tokenizer.decode(new[10:13])
    assert text.strip(), "the tiny model should emit some visible text"
    return text


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("how", ["kwarg", "config-keyword", "config-positional"])
def test_stop_strings(text_target, tokenizer, entry_point, how):
    prompt = tiny_prompt(5, vocab=len(tokenizer))
    stop = stop_string_of(tokenizer, text_target, prompt)
    args, kwargs = (), dict(tokenizer=tokenizer)
    if how == "kwarg":
        kwargs["stop_strings"] = [stop]
    elif how == "config-keyword":
        kwargs["generation_config"] = GenerationConfig(stop_strings=[stop], max_new_tokens=MAX_NEW, do_sample=False)
    else:
        args = (GenerationConfig(stop_strings=[stop], max_new_tokens=MAX_NEW, do_sample=False),)
    expected = plain(text_target, prompt, *args, **kwargs)
    assert expected.shape[1] < prompt.shape[1] + MAX_NEW, "the stop string must stop plain generate() early"
    drafter = self_draft(text_target)
    got = speculative(text_target, prompt, entry_point, drafter, *args, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_stop_strings_without_tokenizer_are_refused(text_target, entry_point):
    with pytest.raises(hf_spec.UnsupportedError, match="tokenizer"):
        speculative(text_target, tiny_prompt(5), entry_point, self_draft(text_target), stop_strings=["x"])


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_positional_generation_config(target, entry_point):
    prompt = tiny_prompt(6)
    config = GenerationConfig(max_new_tokens=9, do_sample=False, repetition_penalty=1.3)
    expected = target.generate(prompt, config)
    got = speculative(target, prompt, entry_point, self_draft(target, top_k=2), config)
    assert torch.equal(got, expected)
    assert got.shape[1] == prompt.shape[1] + 9


# ---------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_statistics_count_what_was_emitted(target, entry_point):
    """A stop inside a fully accepted draft: accepted tokens after the stop are not counted."""
    prompt = tiny_prompt(7)
    free_run = plain(target, prompt)[0, prompt.shape[1]:].tolist()
    eos = free_run[1]  # second token: inside the first step's fully accepted draft of 6
    assert eos != free_run[0]
    drafter = hf_spec.DraftModelDrafter(target, num_tokens=6)
    got = speculative(target, prompt, entry_point, drafter, eos_token_id=eos)
    assert torch.equal(got, plain(target, prompt, eos_token_id=eos))
    stats = drafter.stats
    assert stats.target_forwards == 1
    assert stats.new_tokens == got.shape[1] - prompt.shape[1] == 2
    assert stats.accepted_tokens == 2  # both emitted tokens were accepted draft tokens; 4 more were accepted unused
    assert stats.acceptance_rate == 2 / 6


# ---------------------------------------------------------------------------------------------- returned tensors
def test_returned_scores_and_logits_own_their_memory(target):
    options = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True,
                   output_logits=True)
    out = target.generate(tiny_prompt(8), assistant_model=hf_spec.DraftModelDrafter(target, num_tokens=4, top_k=3),
                          **options)
    for tensor in out.scores + out.logits:
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------------- logits processors
TREE_DRAFTERS = {
    "chain": lambda model: hf_spec.DraftModelDrafter(model, num_tokens=3),
    "top-2 tree": lambda model: hf_spec.DraftModelDrafter(model, num_tokens=3, top_k=2),
    "dynamic tree": lambda model: hf_spec.DraftModelDrafter(model, num_tokens=3, tree="dynamic", tree_budget=12),
    "lookup tree": lambda model: hf_spec.PromptLookupDrafter(max_ngram=1, num_tokens=4, max_candidates=3),
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("drafter", list(TREE_DRAFTERS))
def test_classifier_free_guidance_is_refused(target, entry_point, drafter):
    with pytest.raises(hf_spec.UnsupportedError, match="guidance"):
        speculative(target, tiny_prompt(1), entry_point, TREE_DRAFTERS[drafter](target), guidance_scale=1.5)


@pytest.mark.parametrize("drafter", list(TREE_DRAFTERS))
def test_prefix_allowed_tokens_fn_keyed_by_batch_id(target, drafter):
    """transformers calls the function with the batch index; plain decoding of one prompt always passes 0."""
    rules = {0: lambda last: list(range(1, 48)) if last % 2 else list(range(30, 96))}

    def allowed(batch_id, sequence):
        return rules[batch_id](int(sequence[-1]))

    prompt = tiny_prompt(2)
    expected = plain(target, prompt, prefix_allowed_tokens_fn=allowed)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, prefix_allowed_tokens_fn=allowed,
                          assistant_model=TREE_DRAFTERS[drafter](target))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("drafter", list(TREE_DRAFTERS))
def test_repetition_penalty_with_an_attention_mask(target, drafter):
    """generate() gives the penalty a per-sequence prompt_ignore_length when an attention mask is passed."""
    prompt = tiny_prompt(4)
    options = dict(attention_mask=torch.ones_like(prompt), repetition_penalty=1.4)
    expected = plain(target, prompt, **options)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=TREE_DRAFTERS[drafter](target),
                          **options)
    assert torch.equal(got, expected)


def test_every_processor_generate_builds_is_supported_or_refused(target):
    """Each option that makes generate() build a processor: identical output, or an UnsupportedError."""
    prompt = tiny_prompt(9)
    supported = [
        dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[5], [7, 8]]),
        dict(sequence_bias={(9,): -5.0, (3, 4): 2.0}), dict(min_new_tokens=5, eos_token_id=3),
        dict(min_length=20, eos_token_id=3), dict(forced_eos_token_id=3), dict(suppress_tokens=[1, 2, 3]),
        dict(begin_suppress_tokens=[4]), dict(exponential_decay_length_penalty=(3, 1.5), eos_token_id=3),
        dict(remove_invalid_values=True), dict(renormalize_logits=True), dict(forced_bos_token_id=6),
    ]
    for options in supported:
        expected = plain(target, prompt, **options)
        got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False,
                              assistant_model=TREE_DRAFTERS["top-2 tree"](target), **options)
        assert torch.equal(got, expected), options


def test_user_processor_is_applied_per_row_with_a_warning(target):
    from transformers import LogitsProcessor, LogitsProcessorList

    class BanAfterOdd(LogitsProcessor):
        """Pure, but only written for a batch of one."""

        def __call__(self, input_ids, scores):
            assert input_ids.shape[0] == 1
            if int(input_ids[0, -1]) % 2:
                scores = scores.clone()
                scores[:, 10:50] = -float("inf")
            return scores

    prompt = tiny_prompt(11)
    processors = LogitsProcessorList([BanAfterOdd()])
    expected = plain(target, prompt, logits_processor=processors)
    with pytest.warns(UserWarning, match="BanAfterOdd"):
        got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, logits_processor=processors,
                              assistant_model=TREE_DRAFTERS["dynamic tree"](target))
    assert torch.equal(got, expected)
