"""DraftTree: construction, validation and the structure it hands to the verification engine."""

from __future__ import annotations

import pytest
import torch

from hf_spec.engine.tree import DraftTree


def _tensor(values):
    return torch.tensor(values, dtype=torch.long)


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "parents",
    [
        [0, 0, 1],  # node 0 is its own parent
        [-1, 1, 1],  # node 1 is its own parent
        [-1, 2, 0],  # node 1's parent comes after it
        [-1, 0, 5],  # out of range
        [-2, 0, 1],  # below -1
    ],
)
def test_rejects_parents_that_do_not_precede_children(parents):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="parent"):
        DraftTree(_tensor([1, 2, 3]), _tensor(parents))


def test_rejects_mismatched_tokens_and_parents():
    torch.manual_seed(0)
    with pytest.raises(ValueError):
        DraftTree(_tensor([1, 2, 3]), _tensor([-1, 0]))
    with pytest.raises(ValueError):
        DraftTree(_tensor([[1, 2, 3]]), _tensor([[-1, 0, 1]]))  # not 1-D


def test_rejects_draft_probs_of_wrong_shape():
    torch.manual_seed(0)
    tokens, parents = _tensor([1, 2, 3]), _tensor([-1, 0, 1])
    with pytest.raises(ValueError, match="draft_probs"):
        DraftTree(tokens, parents, torch.full((2, 4), 0.25))  # one row short
    with pytest.raises(ValueError, match="draft_probs"):
        DraftTree(tokens, parents, torch.full((3,), 0.25))  # not 2-D
    with pytest.raises(ValueError, match="draft_probs"):
        DraftTree(tokens, parents, torch.full((4, 4), 0.25))  # one row too many
    tree = DraftTree(tokens, parents, torch.full((3, 4), 0.25))
    assert tree.draft_probs.shape == (3, 4)


# ----------------------------------------------------------------------------------- construction
def test_empty():
    tree = DraftTree.empty()
    assert tree.num_nodes == 0
    assert tree.depths == []
    assert tree.children == [[]]
    assert tree.paths == [[]]
    assert tree.is_chain
    assert tree.block_ancestry().tolist() == [[True]]
    assert tree.block_position_offsets().tolist() == [0]


def test_chain():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 7), dim=-1)
    tree = DraftTree.chain(torch.tensor([5, 3, 3, 1], dtype=torch.int32), probs)
    assert tree.tokens.dtype == torch.long
    assert tree.token_list == [5, 3, 3, 1]
    assert tree.parent_list == [-1, 0, 1, 2]
    assert tree.is_chain
    assert tree.depths == [1, 2, 3, 4]
    assert tree.children == [[0], [1], [2], [3], []]
    assert tree.paths == [[], [5], [5, 3], [5, 3, 3], [5, 3, 3, 1]]
    assert tree.draft_probs is probs
    assert DraftTree.chain(torch.tensor([9])).parent_list == [-1]
    assert DraftTree.chain(torch.tensor([], dtype=torch.long)).num_nodes == 0


def test_from_sequences_merges_shared_prefixes():
    tree = DraftTree.from_sequences([[1, 2, 3], [1, 2, 4], [5]])
    assert tree.num_nodes == 5
    assert tree.token_list == [1, 2, 3, 4, 5]
    assert tree.parent_list == [-1, 0, 1, 1, -1]
    assert tree.draft_probs is None
    assert not tree.is_chain
    assert tree.depths == [1, 2, 3, 3, 1]
    assert tree.children == [[0, 4], [1], [2, 3], [], [], []]
    assert tree.paths == [[], [1], [1, 2], [1, 2, 3], [1, 2, 4], [5]]


def test_from_sequences_duplicates_and_prefix_sequences():
    # A sequence that is a prefix of another, and an exact duplicate, add no nodes.
    tree = DraftTree.from_sequences([[7, 8], [7], [7, 8], [7, 9, 1], []])
    assert tree.token_list == [7, 8, 9, 1]
    assert tree.parent_list == [-1, 0, 0, 2]
    # The same token under different parents gives different nodes.
    tree = DraftTree.from_sequences([[1, 2], [2, 2], [1, 1]])
    assert tree.token_list == [1, 2, 2, 2, 1]
    assert tree.parent_list == [-1, 0, -1, 2, 0]
    assert tree.paths[1:] == [[1], [1, 2], [2], [2, 2], [1, 1]]
    # Nothing at all.
    assert DraftTree.from_sequences([]).num_nodes == 0
    assert DraftTree.from_sequences([[], []]).num_nodes == 0


def test_from_sequences_is_chain_for_single_sequence():
    tree = DraftTree.from_sequences([[4, 4, 2]])
    assert tree.is_chain
    assert tree.parent_list == [-1, 0, 1]
    assert DraftTree.from_sequences([[4, 4, 2], [4, 4, 2, 6]]).is_chain
    assert not DraftTree.from_sequences([[4], [5]]).is_chain


def test_is_chain_needs_each_node_under_the_previous_one():
    assert DraftTree(_tensor([1, 2, 3]), _tensor([-1, 0, 1])).is_chain
    assert not DraftTree(_tensor([1, 2, 3]), _tensor([-1, 0, 0])).is_chain
    assert not DraftTree(_tensor([1, 2]), _tensor([-1, -1])).is_chain


def test_truncated():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 6), dim=-1)
    tree = DraftTree(_tensor([1, 2, 3, 4, 5]), _tensor([-1, 0, -1, 1, 2]), probs)
    cut = tree.truncated(3)
    assert cut.token_list == [1, 2, 3]
    assert cut.parent_list == [-1, 0, -1]
    assert torch.equal(cut.draft_probs, probs[:3])
    assert cut.depths == tree.depths[:3]
    assert cut.block_ancestry().tolist() == tree.block_ancestry()[:4, :4].tolist()
    assert tree.truncated(0).num_nodes == 0
    assert tree.truncated(5).token_list == tree.token_list
    assert tree.truncated(99).num_nodes == 5
    deterministic = DraftTree.from_sequences([[1, 2], [3]]).truncated(2)
    assert deterministic.draft_probs is None
    assert deterministic.token_list == [1, 2]


# ----------------------------------------------------------------------------------- vs brute force
def _random_tree(num_nodes: int, generator: torch.Generator) -> DraftTree:
    parents = [int(torch.randint(-1, index, (), generator=generator)) for index in range(num_nodes)]
    tokens = torch.randint(0, 50, (num_nodes,), generator=generator)
    return DraftTree(tokens, torch.tensor(parents, dtype=torch.long))


def _ancestors(parents: list[int], node: int) -> list[int]:
    """Node indices on the path from the root to ``node`` (inclusive), walking parent pointers."""
    chain = []
    while node != -1:
        chain.append(node)
        node = parents[node]
    return chain[::-1]


@pytest.mark.parametrize("num_nodes", [1, 2, 3, 5, 8, 16, 33, 64])
def test_structure_matches_brute_force_on_random_trees(num_nodes):
    torch.manual_seed(num_nodes)
    generator = torch.Generator().manual_seed(1000 + num_nodes)
    for _ in range(20):
        tree = _random_tree(num_nodes, generator)
        parents, tokens = tree.parent_list, tree.token_list
        size = num_nodes + 1

        expected_ancestry = torch.zeros(size, size, dtype=torch.bool)
        expected_ancestry[0, 0] = True
        expected_offsets = [0]
        expected_paths = [[]]
        for node in range(num_nodes):
            path = _ancestors(parents, node)
            expected_ancestry[node + 1, 0] = True
            for ancestor in path:
                expected_ancestry[node + 1, ancestor + 1] = True
            expected_offsets.append(len(path))
            expected_paths.append([tokens[ancestor] for ancestor in path])

        ancestry = tree.block_ancestry()
        assert ancestry.dtype == torch.bool and ancestry.shape == (size, size)
        assert torch.equal(ancestry, expected_ancestry)
        offsets = tree.block_position_offsets()
        assert offsets.dtype == torch.long
        assert offsets.tolist() == expected_offsets
        assert tree.depths == expected_offsets[1:]
        assert tree.paths == expected_paths
        # Each row attends to exactly its depth + 1 rows, and only to earlier rows.
        assert ancestry.sum(dim=1).tolist() == [offset + 1 for offset in expected_offsets]
        assert not torch.triu(ancestry, diagonal=1).any()

        expected_children = [[] for _ in range(size)]
        for node, parent in enumerate(parents):
            expected_children[parent + 1].append(node)
        assert tree.children == expected_children
        assert tree.is_chain == (parents == list(range(-1, num_nodes - 1)))

        # Truncation keeps a consistent prefix of every structure.
        keep = int(torch.randint(0, num_nodes + 1, (), generator=generator))
        cut = tree.truncated(keep)
        assert torch.equal(cut.block_ancestry(), expected_ancestry[: keep + 1, : keep + 1])
        assert cut.block_position_offsets().tolist() == expected_offsets[: keep + 1]
        assert cut.paths == expected_paths[: keep + 1]


# ----------------------------------------------------------------------------------- dynamic growth
def test_dynamic_growth_never_drafts_a_token_ruled_out_by_a_processor():
    """-inf scores (and NaN rows, where a processor ruled out every token of a draft vocabulary) are never drafted;
    the budget goes to possible tokens and every parent precedes its children."""
    from hf_spec.engine.dynamic_tree import grow_dynamic_tree

    def expand(frontier, tokens, parents):
        scores = torch.full((len(frontier), 6), float("-inf"))
        scores[:, 2] = -0.1  # one possible token per node ...
        if len(tokens) == 1:
            scores[:] = float("nan")  # ... and nothing at all below the first one
        return scores

    tree = grow_dynamic_tree(expand, depth=4, top_k=3, budget=8, device="cpu")
    assert tree.tokens.tolist() == [2] and tree.parents.tolist() == [-1]
    assert grow_dynamic_tree(lambda f, t, p: torch.full((1, 6), float("nan")), 3, 3, 8, "cpu").num_nodes == 0
