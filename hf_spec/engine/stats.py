"""Per-call statistics of a speculative generate() call."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    """Counts of one generate() call; read them from ``drafter.stats`` afterwards.

    ``mean_accepted_tokens`` is Spec-Bench's tau: tokens emitted per target verification forward
    (accepted draft tokens plus the target's own token), 1.0 for plain decoding.
    """

    target_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0

    def record_step(self, drafted: int, accepted: int, emitted: int) -> None:
        self.target_forwards += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.new_tokens += emitted

    @property
    def mean_accepted_tokens(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "mean_accepted_tokens": self.mean_accepted_tokens,
                "acceptance_rate": self.acceptance_rate}
