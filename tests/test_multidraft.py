"""Two drafts per node: SpecHub, RRS with and without replacement.

Acceptance probabilities are checked against closed forms computed independently of the
implementation (hand-checked table below), output distributions with a chi-square test, and a
mismatched rule (RRS verification of SpecHub drafts) must fail the same test.
"""

from __future__ import annotations

import pytest
import torch

from hf_spec import UnsupportedError
from hf_spec.engine.siblings import draw_siblings
from hf_spec.engine.spechub import draw_hub_pair, verify_spechub
from hf_spec.engine.tree import DraftTree
from hf_spec.engine.verify import verify_rejection_sampling
from tests.stats_helpers import chi_square_pvalue

TRIALS = 6000

# p, q, and the one-step acceptance probability of: one draft, RRS (i.i.d.), RRS without replacement, SpecHub.
# SpecHub: 1 - sum_{y != a} (p(y) - q~(y))+ with a = argmax q and q~ = q without a, renormalised.
TABLE = [
    ([.1, .6, .3], [.4, .35, .25], .7, .855, .925, .983333),
    ([.2, .5, .3], [.5, .3, .2], .7, .85, .98, 1.0),
    ([0., 1., 0.], [1 / 3, 1 / 3, 1 / 3], 1 / 3, .555556, .666667, .5),
    ([.1, .2, .3, .4], [.4, .3, .2, .1], .6, .72, .764286, .766667),
]


def one_node_step(p, q, scheme, verify):
    tokens, rows = draw_siblings(q, 2, scheme)
    tree = DraftTree(torch.tensor(tokens), torch.full((len(tokens),), -1), torch.stack(rows))
    verdict = verify(tree, torch.stack([p] + [p] * len(tokens)))
    emitted = tree.token_list[verdict.accepted_nodes[0]] if verdict.accepted_nodes else verdict.next_token
    return bool(verdict.accepted_nodes), emitted


def run(p, q, scheme, verify, trials=TRIALS):
    accepted, counts = 0, torch.zeros(len(p))
    for _ in range(trials):
        ok, token = one_node_step(p, q, scheme, verify)
        accepted += ok
        counts[token] += 1
    return accepted / trials, counts


def within(rate, expected, trials=TRIALS, sigmas=4.5):
    error = (max(expected * (1 - expected), 1e-4) / trials) ** 0.5
    return abs(rate - expected) <= sigmas * error


@pytest.mark.parametrize("row", range(len(TABLE)))
def test_acceptance_matches_closed_forms(row):
    p, q, _single, rrs, rrs_wor, hub = TABLE[row]
    p, q = torch.tensor(p), torch.tensor(q)
    torch.manual_seed(row)
    for scheme, verify, expected in [("iid", verify_rejection_sampling, rrs),
                                     ("without_replacement", verify_rejection_sampling, rrs_wor),
                                     ("spechub", verify_spechub, hub)]:
        rate, counts = run(p, q, scheme, verify)
        assert within(rate, expected), f"{scheme}: {rate:.4f} vs {expected:.4f}"
        if int((p > 0).sum()) == 1:
            assert counts[p.argmax()] == TRIALS, scheme
        else:
            assert chi_square_pvalue(counts, p) > 1e-3, scheme


def random_pair(seed, vocab=6, sparse=False):
    generator = torch.Generator().manual_seed(seed)
    p = torch.rand(vocab, generator=generator) ** 3
    q = torch.rand(vocab, generator=generator) ** 3
    if sparse:
        p[:2] = 0
        q[-2:] = 0
    return p / p.sum(), q / q.sum()


@pytest.mark.parametrize("seed,sparse", [(0, False), (1, False), (2, True)])
def test_spechub_output_follows_target(seed, sparse):
    p, q = random_pair(seed, sparse=sparse)
    torch.manual_seed(seed)
    _, counts = run(p, q, "spechub", verify_spechub)
    assert chi_square_pvalue(counts, p) > 1e-3


def test_negative_control_rrs_rule_on_hub_pairs_fails():
    """The pair law matters: verifying SpecHub's drafts as if they were i.i.d. is biased."""
    p, q = torch.tensor([.5, .4, .1]), torch.tensor([.2, .1, .7])
    torch.manual_seed(0)
    _, counts = run(p, q, "spechub", verify_rejection_sampling, trials=4000)
    assert chi_square_pvalue(counts, p) < 1e-6


def test_hub_pair_always_contains_the_top_draft_token():
    q = torch.tensor([.1, .5, .2, .2])
    torch.manual_seed(0)
    for _ in range(200):
        tokens, rows = draw_hub_pair(q)
        assert 1 in tokens and len(set(tokens)) == 2
        assert all(torch.equal(row, q) for row in rows)


def test_spechub_depth_two_tree():
    """Hub pairs at every node of a depth-2 tree; the first two emitted tokens follow the target."""
    vocab = 4
    p0, q0 = random_pair(3, vocab)
    p1 = torch.stack([random_pair(10 + x, vocab)[0] for x in range(vocab)])
    q1 = torch.stack([random_pair(10 + x, vocab)[1] for x in range(vocab)])
    torch.manual_seed(5)
    counts = torch.zeros(vocab * vocab)
    for _ in range(TRIALS):
        tokens, rows = draw_hub_pair(q0)
        parents = [-1] * len(tokens)
        for index, token in enumerate(list(tokens)):
            child_tokens, child_rows = draw_hub_pair(q1[token])
            tokens += child_tokens
            parents += [index] * len(child_tokens)
            rows += child_rows
        tree = DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.stack(rows))
        target_rows = [p0] + [p1[t] if parent < 0 else p0 for t, parent in zip(tokens, parents)]
        verdict = verify_spechub(tree, torch.stack(target_rows))
        emitted = [tree.token_list[node] for node in verdict.accepted_nodes] + [verdict.next_token]
        if len(emitted) == 1:
            emitted.append(int(torch.multinomial(p1[emitted[0]], 1)))
        counts[emitted[0] * vocab + emitted[1]] += 1
    assert chi_square_pvalue(counts, (p0[:, None] * p1).flatten()) > 1e-3


def test_spechub_refuses_wide_nodes():
    q = torch.tensor([.4, .3, .2, .1])
    with pytest.raises(UnsupportedError, match="two drafts"):
        draw_siblings(q, 3, "spechub")
    tree = DraftTree(torch.tensor([0, 1, 2]), torch.tensor([-1, -1, -1]), torch.stack([q, q, q]))
    with pytest.raises(UnsupportedError, match="two drafts"):
        verify_spechub(tree, torch.stack([q] * 4))
