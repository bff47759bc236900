"""Statistical losslessness of rejection-sampling verification.

A synthetic depth-2 "target" over a small vocabulary: ``p0`` is the distribution of the first token,
``p1[x]`` that of the second token after ``x``. A different "draft" ``q0``, ``q1[x]`` proposes a
tree, the target rows are filled in from each block row's path, and ``verify_rejection_sampling``
runs one speculative step. Whatever the draft, the first two emitted tokens must be distributed as
``p0(x1) * p1[x1](x2)`` (when the step emits only one token, the second comes from a plain sampling
step, ``p1[x1]``). A chi-square goodness-of-fit test checks that over many simulated steps;
deliberately broken verifiers, and a drafter that mislabels its ``draft_probs``, must fail it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable

import pytest
import torch

from hf_spec.engine.tree import DraftTree
from hf_spec.engine.verify import Verdict, verify_rejection_sampling
from tests.stats_helpers import chi_square_pvalue

V = 5
TRIALS = 24_000  # per lossless case (about 4-6 s each on one CPU core)
CONTROL_TRIALS = 4_000  # per negative control: at 1,000 trials they already give p < 1e-28
PASS_P = 1e-3
FAIL_P = 1e-6


# ----------------------------------------------------------------------------------- the synthetic models
def _cdf(probs: torch.Tensor) -> list[float]:
    return probs.cumsum(0).tolist()


def _draw(cdf: list[float], u: float) -> int:
    """Inverse-CDF sampling; never returns a zero-probability token, rounding included."""
    index = bisect.bisect_right(cdf, u)
    if index >= len(cdf):
        index = max(i for i in range(len(cdf)) if cdf[i] > (cdf[i - 1] if i else 0.0))
    return index


class Model:
    """Root distribution ``d0`` (V,), next-token distributions ``d1`` (V, V) and a filler row ``d2``."""

    def __init__(self, d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor):
        self.d0, self.d1, self.d2 = d0.double(), d1.double(), d2.double()
        self.cdf0 = _cdf(self.d0)
        self.cdf1 = [_cdf(row) for row in self.d1]

    def joint(self) -> torch.Tensor:
        """(V, V) probability of the first two tokens."""
        return self.d0[:, None] * self.d1


def _dirichlet(seed: int, shape, alpha: float = 0.7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Gamma(alpha) via torch's sampler would not take a generator: use -log(U)^(1/alpha) weights,
    # which is not Dirichlet but gives fixed, uneven, strictly positive distributions.
    weights = (-torch.rand(shape, generator=generator, dtype=torch.float64).log()) ** (1 / alpha)
    return weights / weights.sum(-1, keepdim=True)


def _normalise(tensor: torch.Tensor) -> torch.Tensor:
    return tensor / tensor.sum(-1, keepdim=True)


TARGET = Model(_dirichlet(1, (V,)), _dirichlet(2, (V, V)), _dirichlet(3, (V,)))
DRAFT = Model(_dirichlet(11, (V,)), _dirichlet(12, (V, V)), _dirichlet(13, (V,)))

# Extremes: the target gives 0 to token 4 at the root and to some tokens after each token, while the
# draft gives 0 to tokens 0 and 1 at the root and puts most of its mass where the target has none.
_t0 = _normalise(TARGET.d0 * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
_t1 = TARGET.d1.clone()
_t1[torch.arange(V), (torch.arange(V) + 1) % V] = 0
_t1[0, 2] = 0
SPARSE_TARGET = Model(_t0, _normalise(_t1), TARGET.d2)
_q0 = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.7], dtype=torch.float64)
_q1 = DRAFT.d1.clone()
_q1[torch.arange(V), torch.arange(V)] = 0  # never repeats the previous token
_q1[:, (torch.arange(V) + 1) % V] *= 5  # and prefers the tokens the target forbids
SPARSE_DRAFT = Model(_q0, _normalise(_q1), DRAFT.d2)


# ----------------------------------------------------------------------------------- drafters
# Each drafter maps a row of uniforms to a DraftTree over the draft model.
Drafter = Callable[[list[float]], DraftTree]


def chain_drafter(draft: Model) -> tuple[int, Drafter]:
    """Chain of two tokens, each sampled from the draft."""
    cache: dict = {}

    def build(u: list[float]) -> DraftTree:
        x1 = _draw(draft.cdf0, u[0])
        x2 = _draw(draft.cdf1[x1], u[1])
        key = (x1, x2)
        if key not in cache:
            cache[key] = DraftTree.chain(torch.tensor([x1, x2]), torch.stack([draft.d0, draft.d1[x1]]))
        return cache[key]

    return 2, build


def _two_level_tree(firsts: list[int], seconds: list[int], root_rows: list[torch.Tensor], draft: Model) -> DraftTree:
    """Root children ``firsts`` (drawn from ``root_rows``), each with one child from ``draft.d1``."""
    tokens, parents, rows = [], [], []
    for x, y, root_row in zip(firsts, seconds, root_rows):
        tokens += [x, y]
        parents += [-1, len(tokens) - 2]
        rows += [root_row, draft.d1[x]]
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.stack(rows))


def iid_tree_drafter(draft: Model, width: int = 3) -> tuple[int, Drafter]:
    """``width`` i.i.d. children of the root, each with one child sampled after it."""
    cache: dict = {}

    def build(u: list[float]) -> DraftTree:
        firsts = [_draw(draft.cdf0, u[k]) for k in range(width)]
        seconds = [_draw(draft.cdf1[x], u[width + k]) for k, x in enumerate(firsts)]
        key = (tuple(firsts), tuple(seconds))
        if key not in cache:
            cache[key] = _two_level_tree(firsts, seconds, [draft.d0] * width, draft)
        return cache[key]

    return 2 * width, build


def without_replacement_drafter(draft: Model, width: int = 3) -> tuple[int, Drafter]:
    """``width`` distinct root children drawn one by one from the renormalised remainder of ``q0``.

    Each root child's ``draft_probs`` row is the renormalised distribution it was drawn from.
    """
    cache: dict = {}
    weights = draft.d0.tolist()

    def build(u: list[float]) -> DraftTree:
        remaining = list(weights)
        firsts = []
        for k in range(width):
            total = sum(remaining)
            x = _draw(list(itertools.accumulate(w / total for w in remaining)), u[k])
            firsts.append(x)
            remaining[x] = 0.0
        seconds = [_draw(draft.cdf1[x], u[width + k]) for k, x in enumerate(firsts)]
        key = (tuple(firsts), tuple(seconds))
        if key not in cache:
            remaining = draft.d0.clone()
            root_rows = []
            for x in firsts:
                root_rows.append(remaining / remaining.sum())
                remaining = remaining.clone()
                remaining[x] = 0
            cache[key] = _two_level_tree(firsts, seconds, root_rows, draft)
        return cache[key]

    return 2 * width, build


def fixed_drafter(tree: DraftTree) -> tuple[int, Drafter]:
    return 0, lambda u: tree


# ----------------------------------------------------------------------------------- simulation
def target_rows(tree: DraftTree, target: Model) -> torch.Tensor:
    """Target distribution at each block row, from the row's path."""
    rows = []
    for path in tree.paths:
        if len(path) == 0:
            rows.append(target.d0)
        elif len(path) == 1:
            rows.append(target.d1[path[0]])
        else:
            rows.append(target.d2)
    return torch.stack(rows)


Verifier = Callable[[DraftTree, torch.Tensor], Verdict]


def simulate(drafter: tuple[int, Drafter], target: Model, verifier: Verifier, trials: int) -> torch.Tensor:
    """(V, V) counts of the first two emitted tokens over ``trials`` simulated speculative steps."""
    num_uniforms, build = drafter
    uniforms = torch.rand(trials, num_uniforms + 1, dtype=torch.float64).tolist()
    counts = torch.zeros(V, V, dtype=torch.long)
    rows_cache: dict = {}
    for u in uniforms:
        tree = build(u)
        key = tuple(tuple(path) for path in tree.paths)  # the target rows depend on the paths only
        if key not in rows_cache:
            rows_cache[key] = target_rows(tree, target)
        verdict = verifier(tree, rows_cache[key])
        emitted = [tree.token_list[node] for node in verdict.accepted_nodes] + [verdict.next_token]
        # The accepted nodes must form a path from the root.
        parent = -1
        for node in verdict.accepted_nodes:
            assert tree.parent_list[node] == parent
            parent = node
        if len(emitted) == 1:
            emitted.append(_draw(target.cdf1[emitted[0]], u[-1]))
        counts[emitted[0], emitted[1]] += 1
    return counts


def _pvalue(drafter, target: Model, verifier: Verifier, trials: int) -> float:
    counts = simulate(drafter, target, verifier, trials)
    assert int(counts.sum()) == trials
    return chi_square_pvalue(counts, target.joint())


# ----------------------------------------------------------------------------------- the chi-square helper
def test_chi_square_helper():
    assert chi_square_pvalue([50, 50], [0.5, 0.5]) == pytest.approx(1.0)
    # Statistic 4 with one degree of freedom: p = 0.0455.
    assert chi_square_pvalue([60, 40], [0.5, 0.5]) == pytest.approx(0.0455, abs=1e-4)
    # Two degrees of freedom: p = exp(-statistic / 2); statistic = 10**2/40 + 0 + 10**2/30.
    statistic = 100 / 40 + 100 / 30
    assert chi_square_pvalue([[50, 30], [20, 0]], [[0.4, 0.3], [0.3, 0.0]]) == pytest.approx(
        math.exp(-statistic / 2), rel=1e-9
    )
    # A count where the expected probability is 0 is impossible.
    assert chi_square_pvalue([10, 0, 1], [0.5, 0.5, 0.0]) == 0.0
    assert chi_square_pvalue([10, 10, 0], [0.5, 0.5, 0.0]) == pytest.approx(1.0)
    # Cells with small expected counts are pooled: [2, 3] expected 2.5 each -> one cell of 5.
    assert chi_square_pvalue([45, 50, 2, 3], [0.475, 0.475, 0.025, 0.025]) > 0.5


# ----------------------------------------------------------------------------------- lossless cases
CASES = {
    "chain": lambda: (chain_drafter(DRAFT), TARGET),
    "iid_tree": lambda: (iid_tree_drafter(DRAFT), TARGET),
    "without_replacement": lambda: (without_replacement_drafter(DRAFT), TARGET),
    "deterministic_tree": lambda: (fixed_drafter(DraftTree.from_sequences([[1, 3], [4, 0], [1, 2]])), TARGET),
    "deterministic_tree_sparse": lambda: (
        # Drafts token 4 (target mass 0) first, then tokens the target forbids after 0 and 2.
        fixed_drafter(DraftTree.from_sequences([[4, 1], [0, 1], [0, 2], [2, 3], [3, 3]])),
        SPARSE_TARGET,
    ),
    "draft_equals_target": lambda: (chain_drafter(TARGET), TARGET),
    "draft_equals_target_tree": lambda: (without_replacement_drafter(TARGET), TARGET),
    "disjoint_support_chain": lambda: (chain_drafter(SPARSE_DRAFT), SPARSE_TARGET),
    "disjoint_support_iid_tree": lambda: (iid_tree_drafter(SPARSE_DRAFT), SPARSE_TARGET),
    "disjoint_support_without_replacement": lambda: (without_replacement_drafter(SPARSE_DRAFT, width=2), SPARSE_TARGET),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rejection_sampling_is_lossless(case):
    torch.manual_seed(sorted(CASES).index(case) + 100)
    drafter, target = CASES[case]()
    counts = simulate(drafter, target, verify_rejection_sampling, TRIALS)
    # Impossible pairs never come out, whatever the draft proposed.
    assert counts[target.joint() == 0].sum() == 0
    pvalue = chi_square_pvalue(counts, target.joint())
    assert pvalue > PASS_P, (case, pvalue)


def test_models_are_far_enough_apart():
    # The draft must differ from the target for the cases above to test anything.
    assert (TARGET.d0 - DRAFT.d0).abs().sum() > 0.3
    assert ((TARGET.d1 - DRAFT.d1).abs().sum(-1) > 0.3).all()
    assert float(torch.minimum(TARGET.d0, DRAFT.d0).sum()) < 0.8


def test_draft_equal_to_target_accepts_everything():
    torch.manual_seed(7)
    _, build = chain_drafter(TARGET)
    for u in torch.rand(2000, 2, dtype=torch.float64).tolist():
        tree = build(u)
        assert verify_rejection_sampling(tree, target_rows(tree, TARGET)).accepted_nodes == [0, 1]


# ----------------------------------------------------------------------------------- negative controls
def accept_everything(tree: DraftTree, target_probs: torch.Tensor) -> Verdict:
    """BROKEN: follows the first child all the way down, then samples from that row's target."""
    accepted, row = [], 0
    while tree.children[row]:
        node = tree.children[row][0]
        accepted.append(node)
        row = node + 1
    return Verdict(accepted, int(torch.multinomial(target_probs[row], 1)))


def residual_is_target(tree: DraftTree, target_probs: torch.Tensor) -> Verdict:
    """BROKEN: the right acceptance test, but a rejection leaves the target unchanged (no residual)."""
    accepted, row = [], 0
    while True:
        p = target_probs[row]
        match = None
        for child in tree.children[row]:
            token = tree.token_list[child]
            q = 1.0 if tree.draft_probs is None else float(tree.draft_probs[child, token])
            if float(torch.rand(())) * q < float(p[token]):
                match = child
                break
        if match is None:
            return Verdict(accepted, int(torch.multinomial(p, 1)))
        accepted.append(match)
        row = match + 1


def stale_root_rows(drafter: tuple[int, Drafter]) -> tuple[int, Drafter]:
    """BROKEN drafter: root children drawn without replacement but labelled with the original ``q0``."""
    num_uniforms, build = drafter

    def broken(u: list[float]) -> DraftTree:
        tree = build(u)
        probs = tree.draft_probs.clone()
        probs[tree.parents == -1] = DRAFT.d0
        return DraftTree(tree.tokens, tree.parents, probs)

    return num_uniforms, broken


CONTROLS = {
    "accept_everything/chain": (accept_everything, "chain", None),
    "accept_everything/iid_tree": (accept_everything, "iid_tree", None),
    "residual_is_target/chain": (residual_is_target, "chain", None),
    "residual_is_target/without_replacement": (residual_is_target, "without_replacement", None),
    "residual_is_target/deterministic_tree": (residual_is_target, "deterministic_tree", None),
    "stale_draft_probs/without_replacement": (verify_rejection_sampling, "without_replacement", stale_root_rows),
}


@pytest.mark.parametrize("control", list(CONTROLS))
def test_broken_verifiers_fail_the_same_test(control):
    torch.manual_seed(sorted(CONTROLS).index(control) + 200)
    verifier, case, break_drafter = CONTROLS[control]
    drafter, target = CASES[case]()
    if break_drafter is not None:
        drafter = break_drafter(drafter)
    pvalue = _pvalue(drafter, target, verifier, CONTROL_TRIALS)
    assert pvalue < FAIL_P, (control, pvalue)
