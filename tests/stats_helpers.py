"""Small statistics helpers for the tests (torch only, no scipy)."""

from __future__ import annotations

import torch


def chi_square_pvalue(observed_counts, expected_probs, min_expected: float = 5.0) -> float:
    """P-value of Pearson's chi-square goodness-of-fit test of ``observed_counts`` against ``expected_probs``.

    Both are flattened, so a joint table can be passed as is. ``expected_probs`` is normalised.
    Cells whose expected count is below ``min_expected`` are pooled into one cell (and that pooled
    cell is dropped if its own expected count is still below ``min_expected``, in which case its
    mass is left out of the test). A count in a cell of expected probability exactly 0 is an
    impossible outcome: the p-value is then 0.
    """
    observed = torch.as_tensor(observed_counts, dtype=torch.float64).flatten()
    probs = torch.as_tensor(expected_probs, dtype=torch.float64).flatten()
    if observed.shape != probs.shape:
        raise ValueError(f"observed {tuple(observed.shape)} and expected {tuple(probs.shape)} differ in size")
    if (probs < 0).any() or probs.sum() <= 0:
        raise ValueError("expected_probs must be non-negative with positive total")
    probs = probs / probs.sum()
    total = observed.sum()
    impossible = probs == 0
    if (observed[impossible] > 0).any():
        return 0.0
    expected = probs * total

    big = expected >= min_expected
    obs_cells = [observed[big]]
    exp_cells = [expected[big]]
    small = (~big) & (~impossible)
    pooled_expected = expected[small].sum()
    if pooled_expected >= min_expected:
        obs_cells.append(observed[small].sum().reshape(1))
        exp_cells.append(pooled_expected.reshape(1))
    obs = torch.cat(obs_cells)
    exp = torch.cat(exp_cells)
    dof = obs.numel() - 1
    if dof < 1:
        raise ValueError("need at least two cells with enough expected count for a chi-square test")
    # When the pooled small cells are dropped, the remaining counts are compared at their own total.
    exp = exp * (obs.sum() / exp.sum())
    statistic = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def binomial_within(successes: int, trials: int, probability: float, num_se: float = 4.0) -> bool:
    """Whether ``successes / trials`` is within ``num_se`` standard errors of ``probability``.

    With ``probability`` 0 or 1 the frequency must match exactly.
    """
    frequency = successes / trials
    se = (probability * (1 - probability) / trials) ** 0.5
    return abs(frequency - probability) <= num_se * se + 1e-12
