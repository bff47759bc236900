"""Per-call statistics of a speculative generate() call."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    """Counts of one generate() call; read them from ``drafter.stats`` afterwards.

    ``mean_accepted_tokens`` is Spec-Bench's tau: tokens emitted per target verification forward
    (accepted draft tokens plus the target's own token), 1.0 for plain decoding. ``steps_by_accepted[a]``
    counts the steps that accepted exactly ``a`` draft tokens (per-depth acceptance: ``accepted_at_least``).
    Wall time per phase, summed over steps: ``draft_seconds`` in the drafter's ``propose``, ``target_seconds`` in
    the target's forwards, ``step_seconds`` whole steps; ``loop_overhead_seconds`` is the rest (tree masks,
    logits processors on the block, verification, cache trimming, stopping criteria). On CUDA, kernels run
    asynchronously: there the split is approximate. ``depth_caps[d]`` counts the steps whose draft depth the
    cost-aware policy (``draft_length="goodput"``) capped at ``d``.
    """

    target_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    steps_by_accepted: dict[int, int] = field(default_factory=dict)
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    step_seconds: float = 0.0
    depth_caps: dict[int, int] = field(default_factory=dict)

    def record_step(self, drafted: int, accepted: int, emitted: int) -> None:
        self.target_forwards += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.new_tokens += emitted
        self.steps_by_accepted[accepted] = self.steps_by_accepted.get(accepted, 0) + 1

    def record_time(self, draft: float, target: float, step: float) -> None:
        self.draft_seconds += draft
        self.target_seconds += target
        self.step_seconds += step

    def record_depth_cap(self, depth: int) -> None:
        self.depth_caps[depth] = self.depth_caps.get(depth, 0) + 1

    @property
    def loop_overhead_seconds(self) -> float:
        """Step time outside the drafter's ``propose`` and the target's forwards."""
        return max(self.step_seconds - self.draft_seconds - self.target_seconds, 0.0)

    def accepted_at_least(self, depth: int) -> float:
        """The share of steps that accepted at least ``depth`` draft tokens (depth ``d`` of the draft was right)."""
        return accepted_at_least(self.steps_by_accepted, depth)

    @property
    def mean_accepted_tokens(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "mean_accepted_tokens": self.mean_accepted_tokens,
                "acceptance_rate": self.acceptance_rate, "loop_overhead_seconds": self.loop_overhead_seconds}


def accepted_at_least(steps_by_accepted: dict[int, int], depth: int) -> float:
    """From counts of steps by accepted draft tokens: the share of steps that accepted at least ``depth``."""
    steps = sum(steps_by_accepted.values())
    if not steps:
        return 0.0
    return sum(count for accepted, count in steps_by_accepted.items() if int(accepted) >= depth) / steps
