"""The attention masks and positions the models actually receive, checked against a brute-force reference.

Every row of a tree forward (target side: ``forward_tree``; draft side: the dynamic tree's draft
forwards over expanded nodes) must give the same logits as an ordinary forward, without any cache,
of the committed context followed by that row's own root-to-node path. A wrong mask on the draft side
would only lower acceptance, which greedy identity tests cannot see; this test sees it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_spec
from hf_spec.drafters import draft_model as draft_model_module
from hf_spec.engine.target import forward_tree, prefill
from hf_spec.engine.tree import DraftTree
from tests.conftest import ARCHITECTURES, tiny_model, tiny_prompt


def full_forward_last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def random_tree(num_nodes: int, seed: int, vocab: int) -> DraftTree:
    generator = torch.Generator().manual_seed(seed)
    parents = [int(torch.randint(-1, index, (), generator=generator)) for index in range(num_nodes)]
    tokens = torch.randint(1, vocab, (num_nodes,), generator=generator)
    return DraftTree(tokens, torch.tensor(parents, dtype=torch.long))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("num_nodes,seed", [(1, 0), (4, 1), (9, 2), (17, 3)])
def test_target_tree_forward_rows_match_path_forwards(arch, num_nodes, seed):
    model = tiny_model(arch)
    context = tiny_prompt(seed, length=10)[0].tolist()
    tree = random_tree(num_nodes, seed, model.config.vocab_size)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill(model, cache, torch.tensor([context]))
        block = forward_tree(model, cache, torch.tensor(context[-1]), tree)
    assert len(tree.paths) == num_nodes + 1
    for row, path in enumerate(tree.paths):  # row 0 is the root, whose path is empty
        expected = full_forward_last_logits(model, context + path)
        torch.testing.assert_close(block.logits[row], expected, msg=f"block row {row}, draft path {path}")


def test_dynamic_tree_draft_forwards_match_path_forwards(monkeypatch):
    """Each draft forward over expanded nodes (cached context + earlier node rows) is checked row by row."""
    target, draft = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    drafter = hf_spec.DraftModelDrafter(draft, num_tokens=4, tree="dynamic", top_k=3, tree_budget=12)
    real_forward = draft_model_module.forward_with_mask
    rows_checked = []

    def checked_forward(model, cache, tokens, positions, allowed):
        committed = drafter._cached_ids.tolist()
        past = cache.get_seq_length()
        if past == len(committed):
            checked_forward.row_tokens = list(committed)  # a new proposal: node rows start after the context
        row_tokens = checked_forward.row_tokens
        assert len(row_tokens) == past
        row_tokens.extend(tokens[0].tolist())
        outputs = real_forward(model, cache, tokens, positions, allowed)
        for row in range(tokens.shape[1]):
            visible = [row_tokens[column] for column in allowed[row].nonzero().flatten().tolist()]
            assert visible[: len(committed)] == committed  # the whole context, then the node's own path
            assert int(positions[0, row]) == len(visible) - 1
            torch.testing.assert_close(outputs.logits[0, row], full_forward_last_logits(model, visible))
            rows_checked.append(len(visible) - len(committed))
        return outputs

    monkeypatch.setattr(draft_model_module, "forward_with_mask", checked_forward)
    prompt = tiny_prompt(5, length=8)
    target.generate(prompt, assistant_model=drafter, do_sample=False, max_new_tokens=12)
    assert rows_checked and max(rows_checked) >= 2  # nodes below depth 1 were drafted and checked
