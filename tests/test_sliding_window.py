"""Sliding-window attention (Gemma 3) far past the window: exact for chains and trees, target and draft.

The tiny Gemma 3 here has a window of 16 and mixes sliding and full-attention layers; prompts plus
new tokens reach several windows. What is checked:

* the target's tree forward (one mask per layer type) gives, row by row, the logits of an ordinary
  forward of that row's sequence, before and after the cache kept a path from the middle of a tree,
  also with trees deeper than the window;
* the draft model's own tree forwards (dynamic trees, several levels before a roll-back) likewise;
* greedy generate() with lookup, draft-model chains, static and dynamic trees equals plain greedy
  generate(), and the returned cache equals plain generate()'s (sliding layers trimmed to the window).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import hf_spec
from hf_spec.drafters import draft_model as draft_model_module
from hf_spec.engine.cache import keep_block_rows
from hf_spec.engine.target import forward_tree, prefill
from hf_spec.engine.tree import DraftTree
from tests.conftest import tiny_model, tiny_prompt
from tests.helpers import perturbed_copy

WINDOW = 16
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def windowed_gemma3(window: int = WINDOW, seed: int = 0):
    return tiny_model("gemma3", seed=seed, sliding_window=window, num_hidden_layers=3, layer_types=LAYER_TYPES,
                      tie_word_embeddings=False)  # untied: the tied tiny model mostly repeats its input token


def ordinary_forward_last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def random_tokens(count: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(1, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def deep_tree(seed: int, vocab: int) -> DraftTree:
    """Three branches, the longest 7 deep (deeper than a window of 4), sharing prefixes."""
    a, b, c = (random_tokens(7, seed + i, vocab) for i in range(3))
    return DraftTree.from_sequences([a, a[:3] + b[:3], c[:2], a[:1] + c[2:4]])


def check_rows(model, block, tree: DraftTree, context: list[int]) -> None:
    for row, path in enumerate(tree.paths):
        torch.testing.assert_close(block.logits[row], ordinary_forward_last_logits(model, context + path),
                                   msg=f"block row {row}, path {path}")


@pytest.mark.parametrize("window", [4, WINDOW])
@pytest.mark.parametrize("shape", ["tree", "chain"])
def test_target_tree_forward_past_the_window_and_after_a_moved_keep(window, shape):
    model = windowed_gemma3(window)
    vocab = model.config.vocab_size
    context = random_tokens(3 * WINDOW, 0, vocab)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill(model, cache, torch.tensor([context]))
        for step in range(2):
            tree = deep_tree(10 * step, vocab) if shape == "tree" else DraftTree.chain(
                torch.tensor(random_tokens(window + 3, 10 * step, vocab)))
            block_start = cache.get_seq_length()
            block = forward_tree(model, cache, torch.tensor(context[-1]), tree)
            check_rows(model, block, tree, context)
            # Keep the path to a deep node (from the middle of the block for the tree) plus a new root token.
            node = max(range(tree.num_nodes), key=lambda index: (tree.depths[index], -index))
            node = tree.parent_list[node] if step == 0 else node
            rows = [0] + [index + 1 for index in range(tree.num_nodes) if _is_ancestor(tree, index, node)]
            keep_block_rows(cache, block_start, rows)
            context = context + tree.paths[node + 1] + random_tokens(1, 99 + step, vocab)
            assert cache.get_seq_length() == len(context) - 1
            for layer in cache.layers:
                if isinstance(layer, DynamicSlidingWindowLayer):
                    assert layer.keys.shape[-2] == window - 1 and not layer.record_past


def _is_ancestor(tree: DraftTree, candidate: int, node: int) -> bool:
    """Whether ``candidate`` is on the root-to-``node`` path (``node`` included)."""
    while node >= 0:
        if node == candidate:
            return True
        node = tree.parent_list[node]
    return False


def test_draft_model_tree_forwards_past_the_window(monkeypatch):
    """Each draft forward over expanded tree nodes equals an ordinary forward of that node's sequence."""
    target = windowed_gemma3()
    drafter = hf_spec.DraftModelDrafter(perturbed_copy(target, 0.1), num_tokens=4, tree="dynamic", top_k=3,
                                        tree_budget=12)
    real_forward = draft_model_module.forward_with_mask
    checked = []

    def checked_forward(model, cache, tokens, positions, allowed, *args, **kwargs):
        committed = drafter._cached_ids.tolist()
        past = cache.get_seq_length()
        if past == len(committed):
            checked_forward.row_tokens = list(committed)  # a new proposal: node rows follow the context
        row_tokens = checked_forward.row_tokens
        row_tokens.extend(tokens[0].tolist())
        outputs = real_forward(model, cache, tokens, positions, allowed, *args, **kwargs)
        for row in range(tokens.shape[1]):
            sequence = [row_tokens[column] for column in allowed[row].nonzero().flatten().tolist()]
            torch.testing.assert_close(outputs.logits[0, row], ordinary_forward_last_logits(model, sequence))
            checked.append(len(sequence))
        return outputs

    monkeypatch.setattr(draft_model_module, "forward_with_mask", checked_forward)
    prompt = tiny_prompt(5, length=2 * WINDOW)
    target.generate(prompt, assistant_model=drafter, do_sample=False, max_new_tokens=8)
    assert checked and min(checked) > 2 * WINDOW  # every checked sequence was longer than the window


def drafters(target):
    draft = perturbed_copy(target, 0.1)
    return {
        "lookup-chain": lambda: hf_spec.PromptLookupDrafter(max_ngram=2, num_tokens=4),
        "lookup-tree": lambda: hf_spec.PromptLookupDrafter(max_ngram=1, num_tokens=4, max_candidates=3),
        "draft-chain": lambda: hf_spec.DraftModelDrafter(draft, num_tokens=4),
        "draft-static-tree": lambda: hf_spec.DraftModelDrafter(draft, num_tokens=4, top_k=2),
        "draft-dynamic-tree": lambda: hf_spec.DraftModelDrafter(draft, num_tokens=4, tree="dynamic", top_k=2,
                                                                tree_budget=12),
    }


@pytest.mark.parametrize("name", ["lookup-chain", "lookup-tree", "draft-chain", "draft-static-tree",
                                  "draft-dynamic-tree"])
def test_greedy_identity_far_past_the_window(name):
    target = windowed_gemma3()
    drafter = drafters(target)[name]()
    prompt = tiny_prompt(1, length=12)
    max_new = 3 * WINDOW
    expected = target.generate(prompt, max_new_tokens=max_new, do_sample=False)
    got = target.generate(prompt, max_new_tokens=max_new, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, expected)
    assert drafter.stats.accepted_tokens >= 5  # rows were accepted and rejected past the window


def test_returned_cache_matches_plain_generate():
    target = windowed_gemma3()
    prompt = tiny_prompt(2, length=20)
    options = dict(max_new_tokens=2 * WINDOW, do_sample=False, return_dict_in_generate=True)
    expected = target.generate(prompt, **options)
    drafter = hf_spec.DraftModelDrafter(perturbed_copy(target, 0.1), num_tokens=4, top_k=2)
    got = target.generate(prompt, assistant_model=drafter, **options)
    assert torch.equal(got.sequences, expected.sequences)
    ours, theirs = got.past_key_values, expected.past_key_values
    assert ours.get_seq_length() == theirs.get_seq_length() == got.sequences.shape[1] - 1
    for layer, reference in zip(ours.layers, theirs.layers):
        assert type(layer) is type(reference)
        assert getattr(layer, "record_past", False) is False
        torch.testing.assert_close(layer.keys, reference.keys)
        torch.testing.assert_close(layer.values, reference.values)
