"""Losses shared by draft-head methods.

- ``soft_cross_entropy``: cross-entropy against a teacher distribution (the target's own next-token
  distribution); it equals the KL divergence up to the teacher's entropy, a constant for the student.
- ``kl_divergence``: ``KL(teacher || student)``, the Medusa-2 self-distillation loss of the adapted
  target against the target with adapters disabled.
- ``head_loss_weights``: Medusa's ``decay**k`` weighting of head ``k`` (0.8 in Cai et al. 2024), since
  later heads are less accurate and matter less to the accepted length.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_v softmax(teacher)_v * log_softmax(student)_v`` (computed in float32)."""
    teacher = torch.softmax(teacher_logits.float(), dim=-1)
    return -(teacher * torch.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(teacher) || softmax(student))`` (float32)."""
    return F.kl_div(torch.log_softmax(student_logits.float(), dim=-1), torch.log_softmax(teacher_logits.float(), dim=-1),
                    log_target=True, reduction="batchmean")


def hard_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits.float(), labels)


def head_loss_weights(num_heads: int, decay: float) -> list[float]:
    return [decay**index for index in range(num_heads)]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps`` optimizer steps (Medusa-2's head-loss warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)
