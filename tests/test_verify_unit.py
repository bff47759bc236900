"""Verification rules on small hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from hf_spec.engine.tree import DraftTree
from hf_spec.engine.verify import Verdict, verify_greedy, verify_rejection_sampling
from tests.stats_helpers import binomial_within, chi_square_pvalue

V = 6


def _scores(argmaxes: list[int], vocab: int = V) -> torch.Tensor:
    """One row of logits per block row whose argmax is the given token (other entries random, lower)."""
    scores = torch.randn(len(argmaxes), vocab)
    for row, token in enumerate(argmaxes):
        scores[row, token] = scores[row].max() + 1.0
    return scores


def _one_hot(tokens: list[int], vocab: int = V) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).double()


def _tree(tokens, parents, draft_probs=None) -> DraftTree:
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), draft_probs)


# ----------------------------------------------------------------------------------- greedy
def test_greedy_accepts_whole_chain_and_takes_bonus_from_last_row():
    torch.manual_seed(0)
    tree = DraftTree.chain(torch.tensor([1, 2, 3]))
    verdict = verify_greedy(tree, _scores([1, 2, 3, 4]))
    assert verdict == Verdict([0, 1, 2], 4)
    assert verdict.block_rows == [0, 1, 2, 3]


def test_greedy_accepts_nothing():
    torch.manual_seed(0)
    tree = DraftTree.chain(torch.tensor([1, 2, 3]))
    verdict = verify_greedy(tree, _scores([5, 2, 3, 4]))
    assert verdict == Verdict([], 5)
    assert verdict.block_rows == [0]


def test_greedy_stops_at_first_mismatch_in_chain():
    torch.manual_seed(0)
    tree = DraftTree.chain(torch.tensor([1, 2, 3]))
    # Row 2 (after token 2) wants 0, not the drafted 3; row 3 is never looked at.
    assert verify_greedy(tree, _scores([1, 2, 0, 3])) == Verdict([0, 1], 0)


def test_greedy_empty_tree_is_plain_greedy_step():
    torch.manual_seed(0)
    assert verify_greedy(DraftTree.empty(), _scores([4])) == Verdict([], 4)


def test_greedy_picks_the_matching_sibling():
    torch.manual_seed(0)
    # Root children: node 0 (token 1) and node 2 (token 3); node 1 (token 2) under node 0,
    # nodes 3 (token 4) and 4 (token 0) under node 2.
    tree = DraftTree.from_sequences([[1, 2], [3, 4], [3, 0]])
    assert tree.parent_list == [-1, 0, -1, 2, 2]
    # Row 0 wants 3 -> node 2; row 3 (node 2) wants 0 -> node 4 (second child); row 5 wants 2.
    scores = _scores([3, 5, 5, 0, 5, 2])
    verdict = verify_greedy(tree, scores)
    assert verdict == Verdict([2, 4], 2)
    assert verdict.block_rows == [0, 3, 5]
    # Same tree, target wants the first branch all the way.
    assert verify_greedy(tree, _scores([1, 2, 5, 5, 5, 5])) == Verdict([0, 1], 5)
    # Target wants token 4 at the root: a grandchild's token, but not a root child.
    assert verify_greedy(tree, _scores([4, 2, 5, 0, 5, 2])) == Verdict([], 4)


def test_greedy_deeper_path():
    torch.manual_seed(0)
    sequences = [[1, 1, 1, 1], [1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 0], [2, 2, 2, 2]]
    tree = DraftTree.from_sequences(sequences)
    # Walk 1 -> 2 -> 3 -> 5, then the bonus token from the row of the last accepted node.
    wanted = {(): 1, (1,): 2, (1, 2): 3, (1, 2, 3): 5, (1, 2, 3, 5): 4}
    argmaxes = [wanted.get(tuple(path), 0 if path else 5) for path in tree.paths]
    verdict = verify_greedy(tree, _scores(argmaxes))
    assert [tree.token_list[node] for node in verdict.accepted_nodes] == [1, 2, 3, 5]
    assert tree.paths[verdict.accepted_nodes[-1] + 1] == [1, 2, 3, 5]
    assert verdict.next_token == 4
    # Accepted nodes form a root-to-node path.
    parents = [-1] + verdict.accepted_nodes[:-1]
    assert [tree.parent_list[node] for node in verdict.accepted_nodes] == parents


def test_greedy_works_on_float16_scores_and_ignores_draft_probs():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, V), dim=-1)
    tree = DraftTree.chain(torch.tensor([3, 1]), probs)
    assert verify_greedy(tree, _scores([3, 1, 2]).half()) == Verdict([0, 1], 2)


# ----------------------------------------------------------------------------------- rejection sampling, exact
def test_rs_point_mass_target_on_draft_is_always_accepted():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(3, V, dtype=torch.float64), dim=-1)
    tree = DraftTree.chain(torch.tensor([1, 2, 4]), q)
    target = _one_hot([1, 2, 4, 3])
    for _ in range(300):
        assert verify_rejection_sampling(tree, target) == Verdict([0, 1, 2], 3)
    # Same with deterministic drafts.
    deterministic = DraftTree.chain(torch.tensor([1, 2, 4]))
    for _ in range(100):
        assert verify_rejection_sampling(deterministic, target) == Verdict([0, 1, 2], 3)


def test_rs_zero_target_mass_is_always_rejected_and_never_emitted():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.0, 0.2], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    tree = DraftTree.chain(torch.tensor([2, 0]), torch.stack([q, q]))
    target = torch.stack([p, p, p])
    # Residual = norm(max(p - q, 0)) = norm([0.25, 0.05, 0, 0]) -> only tokens 0 and 1.
    seen = set()
    for _ in range(400):
        verdict = verify_rejection_sampling(tree, target)
        assert verdict.accepted_nodes == []
        assert verdict.next_token in (0, 1)
        seen.add(verdict.next_token)
    assert seen == {0, 1}


def test_rs_residual_can_be_a_point_mass():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    # Drafted token 2 has p = 0: rejected; residual max(p - q, 0) = [0.1, 0, 0, 0] -> token 0.
    tree = DraftTree(torch.tensor([2]), torch.tensor([-1]), q.unsqueeze(0))
    for _ in range(200):
        assert verify_rejection_sampling(tree, torch.stack([p, p])) == Verdict([], 0)


def test_rs_deterministic_rejection_removes_the_token():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    target = torch.stack([p, _one_hot([3], 4)[0]])
    tree = DraftTree.from_sequences([[0]])  # point mass on token 0
    outcomes = {}
    for _ in range(400):
        verdict = verify_rejection_sampling(tree, target)
        key = (tuple(verdict.accepted_nodes), verdict.next_token)
        outcomes[key] = outcomes.get(key, 0) + 1
    # Accepted with probability p(0) = 0.5 (then the bonus is 3); if rejected, residual = [0, 1, 0, 0].
    assert set(outcomes) == {((0,), 3), ((), 1)}
    assert binomial_within(outcomes[((0,), 3)], 400, 0.5)


def test_rs_deterministic_second_sibling_takes_the_rest():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    tree = DraftTree.from_sequences([[0], [1]])
    target = torch.stack([p, _one_hot([2], 4)[0], _one_hot([3], 4)[0]])
    outcomes = {}
    for _ in range(400):
        verdict = verify_rejection_sampling(tree, target)
        key = (tuple(verdict.accepted_nodes), verdict.next_token)
        outcomes[key] = outcomes.get(key, 0) + 1
    # After token 0 is rejected the residual is a point mass on 1, which node 1 carries: never empty.
    assert set(outcomes) == {((0,), 2), ((1,), 3)}
    assert binomial_within(outcomes[((0,), 2)], 400, 0.5)


def test_rs_draft_equal_to_target_is_always_accepted():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, V, dtype=torch.float64), dim=-1)
    for _ in range(300):
        tokens = [int(torch.multinomial(p[0], 1)), 0]
        tokens[1] = int(torch.multinomial(p[1], 1))
        tree = DraftTree.chain(torch.tensor(tokens), p[:2])
        verdict = verify_rejection_sampling(tree, p)
        assert verdict.accepted_nodes == [0, 1]


def test_rs_raises_when_draft_probs_give_zero_to_drafted_token():
    torch.manual_seed(0)
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    tree = DraftTree(torch.tensor([2]), torch.tensor([-1]), q)
    p = torch.full((2, 4), 0.25, dtype=torch.float64)
    with pytest.raises(ValueError, match="probability 0"):
        verify_rejection_sampling(tree, p)


def test_rs_empty_tree_samples_from_root_row():
    torch.manual_seed(0)
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    for _ in range(50):
        assert verify_rejection_sampling(DraftTree.empty(), p) == Verdict([], 2)


def test_rs_bonus_token_comes_from_the_accepted_leaf_row():
    torch.manual_seed(0)
    # Root children: node 0 (token 1), node 1 (token 2); node 2 (token 3) under node 1.
    tree = DraftTree(torch.tensor([1, 2, 3]), torch.tensor([-1, -1, 1]))
    target = torch.stack([_one_hot([2], 4)[0], _one_hot([0], 4)[0], _one_hot([3], 4)[0], _one_hot([1], 4)[0]])
    for _ in range(100):
        verdict = verify_rejection_sampling(tree, target)
        assert verdict == Verdict([1, 2], 1)
        assert verdict.block_rows == [0, 2, 3]


# ----------------------------------------------------------------------------------- acceptance probability
P = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
Q = torch.tensor([0.4, 0.2, 0.3, 0.1], dtype=torch.float64)


def test_rs_acceptance_probability_matches_closed_form():
    torch.manual_seed(1234)
    trials = 20_000
    tokens = torch.multinomial(Q, trials, replacement=True).tolist()
    target = torch.stack([P, P])
    trees = {x: DraftTree(torch.tensor([x]), torch.tensor([-1]), Q.unsqueeze(0)) for x in range(4)}
    accepted = [0] * 4
    drawn = [0] * 4
    rejected_next = [0] * 4
    for x in tokens:
        verdict = verify_rejection_sampling(trees[x], target)
        drawn[x] += 1
        if verdict.accepted_nodes == [0]:
            accepted[x] += 1
        else:
            assert verdict.accepted_nodes == []
            rejected_next[verdict.next_token] += 1
    # Overall: P(accept) = sum_x q(x) min(1, p(x)/q(x)) = sum_x min(p(x), q(x)) = 0.1+0.2+0.2+0.1.
    overall = float(torch.minimum(P, Q).sum())
    assert overall == pytest.approx(0.6)
    assert binomial_within(sum(accepted), trials, overall)
    # Per token: P(accept | x) = min(1, p(x)/q(x)); exactly 1 where p >= q.
    for x in range(4):
        ratio = min(1.0, float(P[x] / Q[x]))
        assert binomial_within(accepted[x], drawn[x], ratio), (x, accepted[x], drawn[x], ratio)
    assert accepted[1] == drawn[1] and accepted[3] == drawn[3]
    # On rejection the next token follows norm(max(p - q, 0)) = [0, 0.2, 0, 0.2] / 0.4.
    residual = (P - Q).clamp_min(0)
    assert rejected_next[0] == rejected_next[2] == 0
    assert chi_square_pvalue(rejected_next, residual) > 1e-3
