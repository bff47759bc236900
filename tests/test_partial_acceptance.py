"""Drafts that agree with the target often but not always: partial acceptance inside trees.

Random drafts are nearly always rejected at depth 1, and a draft equal to the target is always
accepted whole; neither makes the engine keep a path from the middle of a tree. Here the draft is
the target itself with small gaussian noise on every weight (float64), so steps accept some draft
tokens and reject the rest, and accepted paths of static and dynamic trees are usually not the
first block rows: the KV cache must move them (``keep_block_rows`` with a non-prefix path). Every
case is still token-for-token identical to plain greedy ``generate()``.
"""

from __future__ import annotations


import pytest
import torch

import hf_spec
from hf_spec.engine import cache as cache_module
from hf_spec.engine import loop as loop_module
from tests.helpers import perturbed_copy
from tests.conftest import tiny_model, tiny_prompt

MAX_NEW = 40
GEMMA3_WINDOWED = dict(sliding_window=16, num_hidden_layers=3, tie_word_embeddings=False,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])
# Relative noise on each weight that makes the draft agree often but not always (measured on these models:
# 3 to 15 steps of 11 to 23 accept a part of the draft, 0 < accepted < depth; 7 to 11 keep a moved path).
CASES = {"llama": ({}, 0.2), "qwen2": ({}, 0.2), "gemma3": (GEMMA3_WINDOWED, 0.1)}
TREES = {
    "chain": dict(tree="chain"),
    "static": dict(tree="static", top_k=2),
    "dynamic": dict(tree="dynamic", top_k=2, tree_budget=16),  # budget big enough to keep depth-4 nodes
}


class StepRecorder:
    """What the engine did each step: the depth of the proposed tree and the block rows it kept."""

    def __init__(self, monkeypatch, drafter):
        self.depths: list[int] = []
        self.kept_rows: list[list[int]] = []
        real_keep, real_propose = cache_module.keep_block_rows, drafter.propose

        def propose(request):
            tree = real_propose(request)
            self.depths.append(max(tree.depths, default=0))
            return tree

        def keep(cache, block_start, rows):
            self.kept_rows.append(list(rows))
            real_keep(cache, block_start, rows)

        monkeypatch.setattr(drafter, "propose", propose)
        monkeypatch.setattr(loop_module, "keep_block_rows", keep)

    @property
    def steps(self) -> list[tuple[int, int]]:
        """(accepted draft tokens, tree depth) per step: the kept rows are the root and the accepted nodes."""
        return [(len(rows) - 1, depth) for rows, depth in zip(self.kept_rows, self.depths)]

    @property
    def partial_steps(self) -> int:
        return sum(0 < accepted < depth for accepted, depth in self.steps)

    @property
    def moved_keeps(self) -> int:
        """Steps whose accepted path was not the first block rows (the cache had to move it)."""
        return sum(rows != list(range(len(rows))) for rows in self.kept_rows)


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("arch", list(CASES))
def test_partial_acceptance_is_lossless(monkeypatch, arch, tree):
    overrides, scale = CASES[arch]
    target = tiny_model(arch, **overrides)
    drafter = hf_spec.DraftModelDrafter(perturbed_copy(target, scale), num_tokens=4, **TREES[tree])
    recorder = StepRecorder(monkeypatch, drafter)
    prompt = tiny_prompt(1)
    expected = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter,
                          draft_length="fixed")
    assert torch.equal(got, expected)
    assert drafter.tree_spec == drafter.default_tree_spec and drafter.tree_spec.shape == tree
    assert recorder.partial_steps >= 2, recorder.steps  # measured: 3 to 15 of 11 to 23 steps
    assert drafter.stats.accepted_tokens >= 8, recorder.steps
    if tree == "chain":
        assert recorder.moved_keeps == 0  # a chain's accepted path is always a prefix of the block
    else:
        assert recorder.moved_keeps >= 5, recorder.steps
