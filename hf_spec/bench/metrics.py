"""Spec-Bench's two figures, from raw measurements.

Spec-Bench (Xia et al. 2024) reports, per task group and overall:

- speedup: the method's tokens per second over the baseline's (plain decoding) on the same inputs;
- mean accepted tokens (tau): tokens emitted per target decoding step, i.e. accepted draft tokens
  plus the target's own token; 1.0 for plain decoding.

Beside them, per-depth acceptance (EAGLE's and Medusa's per-head figure): the share of target steps that
accepted at least ``d`` draft tokens, for each ``d``, for methods whose steps hf_spec sees.

Here tokens per second of a set of generations is their total new tokens over their total wall time.
Speedup is computed per repetition, against the baseline's generations of the same repetition (same
inputs, measured minutes apart), and the median over repetitions is reported, which resists a
repetition disturbed by other load. Tau pools all generations: total new tokens over total decoding
steps, the mean over steps.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Iterable

from ..engine.stats import accepted_at_least
from .measure import Measurement

MAX_REPORTED_DEPTH = 8

OVERALL = "overall"


def tokens_per_second(records: Iterable[Measurement]) -> float:
    records = list(records)
    seconds = sum(record.seconds for record in records)
    return sum(record.new_tokens for record in records) / seconds if seconds > 0 else 0.0


def mean_accepted_tokens(records: Iterable[Measurement]) -> float:
    records = list(records)
    steps = sum(record.target_forwards for record in records)
    return sum(record.new_tokens for record in records) / steps if steps else 0.0


def by_repeat(records: Iterable[Measurement]) -> dict[int, list[Measurement]]:
    grouped: dict[int, list[Measurement]] = defaultdict(list)
    for record in records:
        grouped[record.repeat].append(record)
    return dict(grouped)


def speedup(records: Iterable[Measurement], baseline: Iterable[Measurement]) -> float | None:
    """Median over repetitions of tokens/s of ``records`` over tokens/s of ``baseline`` in that repetition."""
    mine, theirs = by_repeat(records), by_repeat(baseline)
    ratios = [tokens_per_second(mine[repeat]) / tokens_per_second(theirs[repeat])
              for repeat in sorted(mine) if repeat in theirs and tokens_per_second(theirs[repeat]) > 0]
    return statistics.median(ratios) if ratios else None


def median_tokens_per_second(records: Iterable[Measurement]) -> float:
    per_repeat = [tokens_per_second(group) for group in by_repeat(records).values()]
    return statistics.median(per_repeat) if per_repeat else 0.0


def summarize(measurements: list[Measurement], methods: list[str], groups: list[str], baseline: str) -> list[dict]:
    """One row per method: per group and overall speedup, median tokens/s and tau; identity where checked."""
    def cell(method: str, group: str) -> dict:
        def belongs(record: Measurement, name: str) -> bool:
            return record.method == name and (group == OVERALL or record.group == group)

        mine = [record for record in measurements if belongs(record, method)]
        base = [record for record in measurements if belongs(record, baseline)]
        return {"speedup": speedup(mine, base), "tokens_per_second": median_tokens_per_second(mine),
                "mean_accepted_tokens": mean_accepted_tokens(mine), "generations": len(mine)}

    rows = []
    for method in methods:
        checked = [record.identical for record in measurements if record.method == method and record.identical is not None]
        rows.append({
            "method": method,
            "groups": {group: cell(method, group) for group in groups},
            OVERALL: cell(method, OVERALL),
            "identical": all(checked) if checked else None,
            "mismatched_generations": checked.count(False),
            "accepted_at_least": acceptance_by_depth([record for record in measurements if record.method == method]),
            "ms_per_step": phase_ms_per_step([record for record in measurements if record.method == method]),
        })
    return rows


def phase_ms_per_step(records: Iterable[Measurement]) -> dict[str, float] | None:
    """Milliseconds per target step in the drafter, the target's forwards and the rest of the loop (None for methods
    whose steps hf_spec cannot see)."""
    timed = [record for record in records if record.phase_seconds]
    steps = sum(record.target_forwards for record in timed)
    if not steps:
        return None
    return {phase: 1000 * sum(record.phase_seconds[phase] for record in timed) / steps
            for phase in ("draft", "target", "loop_overhead")}


def acceptance_by_depth(records: Iterable[Measurement], max_depth: int = MAX_REPORTED_DEPTH) -> list[float] | None:
    """Per-depth acceptance: entry ``d - 1`` is the share of target steps that accepted at least ``d`` draft tokens,
    over every generation of ``records`` (None for methods whose steps hf_spec cannot see)."""
    histogram: dict[int, int] = defaultdict(int)
    for record in records:
        for accepted, count in (record.steps_by_accepted or {}).items():
            histogram[int(accepted)] += count
    if not histogram:
        return None
    deepest = min(max(1, max(histogram)), max_depth)
    return [accepted_at_least(histogram, depth) for depth in range(1, deepest + 1)]
