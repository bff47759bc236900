"""Timing generations fairly: warm-up, repetitions, interleaved order, one record per generation.

Following Spec-Bench (Xia et al. 2024), every method decodes the same inputs on the same machine in
the same run, so ratios to the baseline are not skewed by other load on the machine. Here, besides:

- each method is warmed up first (lazy initialisation, first-call kernel selection);
- each repetition visits every item, and for each item runs all methods in an order rotated by one
  per (repetition, item), so no method always runs first, last or right after another;
- sampled runs reseed torch per (item, repetition), the same seed for every method.

Each ``Measurement`` records the wall time of one ``generate()`` call, its new tokens, the target's
decoding steps (``target_forwards``: verification forwards for speculative methods, one per token for
plain decoding; the prompt prefill hf_spec runs separately is not a decoding step) and the draft
tokens accepted. hf_spec drafters report these in ``drafter.stats``; for transformers' methods the
target's forward calls are counted with a hook, and each is taken to emit its accepted draft tokens
plus one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from hf_spec.errors import UnsupportedError

from .methods import Method
from .render import BenchItem

WARMUP_TOKENS = 16


@dataclass
class Measurement:
    method: str
    item: str
    group: str
    repeat: int
    seconds: float
    new_tokens: int
    target_forwards: int
    accepted_tokens: int
    drafted_tokens: int | None = None
    identical: bool | None = None  # to the baseline, for greedy runs
    steps_by_accepted: dict[int, int] | None = None  # hf_spec methods: steps by accepted draft tokens
    phase_seconds: dict[str, float] | None = None  # hf_spec methods: draft / target / loop overhead, summed

    def as_dict(self) -> dict:
        return asdict(self)


class ForwardCounter:
    """Counts a model's forward calls (for transformers' own methods, whose decoding steps hf_spec cannot see)."""

    def __init__(self, *models):
        self.calls = 0
        self.handles = [model.register_forward_pre_hook(self._count) for model in models]

    def _count(self, *_):
        self.calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def warm_up(methods: list[Method], item: BenchItem, rounds: int = 1) -> dict[str, str]:
    """Run each method ``rounds`` times on a short generation; returns the methods that cannot run here and why."""
    unsupported = {}
    for method in methods:
        try:
            for _ in range(rounds):
                method.generate(item.input_ids, max_new_tokens=WARMUP_TOKENS)
        except UnsupportedError as error:
            unsupported[method.name] = str(error)
    return unsupported


def interleaved_order(methods: list[Method], step: int) -> list[Method]:
    """``methods`` rotated by ``step``: over consecutive steps each method takes every position in turn."""
    shift = step % len(methods)
    return methods[shift:] + methods[:shift]


def measure(target, methods: list[Method], items: list[BenchItem], repeats: int, seed: int = 0,
            sampling: bool = False, progress: bool = True) -> tuple[list[Measurement], dict[tuple, list[int]]]:
    """Time every method on every item ``repeats`` times.

    Returns the measurements and the generated token ids keyed by ``(method, item id, repeat)``.
    """
    counter = ForwardCounter(target, *[method.model for method in methods if method.model is not None])
    measurements: list[Measurement] = []
    outputs: dict[tuple, list[int]] = {}
    total = repeats * len(items) * len(methods)
    try:
        with tqdm(total=total, desc="bench", unit="gen", disable=not progress) as bar:
            for repeat in range(repeats):
                for index, item in enumerate(items):
                    for method in interleaved_order(methods, repeat * len(items) + index):
                        bar.set_postfix_str(f"{method.name} on {item.id}", refresh=False)
                        if sampling:
                            torch.manual_seed(seed * 1_000_003 + repeat * 10_007 + index)
                        record, tokens = run_once(method, item, counter, repeat)
                        measurements.append(record)
                        outputs[(method.name, item.id, repeat)] = tokens
                        bar.update()
    finally:
        counter.remove()
    return measurements, outputs


def run_once(method: Method, item: BenchItem, counter: ForwardCounter, repeat: int) -> tuple[Measurement, list[int]]:
    counter.calls = 0
    start = time.perf_counter()
    output = method.generate(item.input_ids)
    seconds = time.perf_counter() - start
    tokens = output[0, item.input_ids.shape[1]:].tolist()
    if method.drafter is not None:
        stats = method.drafter.stats
        forwards, accepted, drafted = stats.target_forwards, stats.accepted_tokens, stats.drafted_tokens
        histogram = dict(stats.steps_by_accepted)
        phases = {"draft": stats.draft_seconds, "target": stats.target_seconds,
                  "loop_overhead": stats.loop_overhead_seconds}
    else:
        forwards = counter.calls
        accepted, drafted, histogram, phases = max(len(tokens) - forwards, 0), None, None, None
    record = Measurement(method.name, item.id, item.group, repeat, seconds, len(tokens), forwards, accepted, drafted,
                         steps_by_accepted=histogram, phase_seconds=phases)
    return record, tokens
