"""Losses shared by draft-head methods.

- ``soft_cross_entropy``: cross-entropy against a teacher distribution (the target's own next-token
  distribution); it equals the KL divergence up to the teacher's entropy, a constant for the student.
- ``kl_divergence``: ``KL(teacher || student)``, the Medusa-2 self-distillation loss of the adapted
  target against the target with adapters disabled.
- ``soft_cross_entropy_on_subset``: the same against the teacher's probabilities of a draft vocabulary's tokens
  only, for heads that score just that subset (see its docstring for why they are not renormalised).
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


def soft_cross_entropy_on_subset(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``-sum_{v in S} p_v log q_v`` averaged over rows, and each row's kept mass ``p(S)`` (float32).

    ``teacher_logits`` are ``(n, V)`` over the target's vocabulary and ``p = softmax(teacher_logits)`` over all of
    it; ``student_logits`` are ``(n, N)`` over the draft vocabulary ``S`` (target ids ``keep``), ``q`` their softmax.
    ``p`` restricted to ``S`` is not renormalised: per row the loss equals ``p(S)`` times the cross-entropy to the
    renormalised ``p(.|S)``, so its minimiser is still ``q = p(.|S)`` while a position where the target puts most of
    its mass outside ``S`` (whose token the head could not propose anyway) weighs less, in proportion. It is the
    soft counterpart of dropping hard labels outside ``S``. EAGLE-3 (Li et al. 2025) instead renormalises (softmax
    over the kept logits) and drops positions whose target argmax is outside ``S``; FR-Spec (Zhao et al. 2025)
    trims a trained drafter's output layer without retraining it.
    """
    teacher = torch.softmax(teacher_logits.float(), dim=-1).index_select(-1, keep)
    loss = -(teacher * torch.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()
    return loss, teacher.sum(-1)


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


def soft_cross_entropy_to_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_v teacher_probs_v * log_softmax(student)_v`` (float32), for teacher probabilities
    computed once and reused (e.g. by several drafting steps that predict the same position)."""
    return -(teacher_probs.float() * torch.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()
