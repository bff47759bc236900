"""The Medusa training objective: target + heads as one module that ``accelerate`` can prepare.

Medusa-1 (Cai et al. 2024): the target is frozen; head ``k`` at position ``t`` reads the target's last
hidden state ``h_t`` and learns ``x_{t+2+k}``, with loss ``sum_k decay^k * CE_k``. The label is either
the data's token (``labels="hard"``) or the target's own distribution for that token, i.e. the
target's logits at position ``t+1+k`` (``labels="soft"``): heads then imitate what the target would
verify, even on teacher-forced data the target did not write.

Medusa-2: LoRA adapters (peft) on the target train jointly,
``L = L_LM + lambda_t * sum_k decay^k * CE_k``, where ``L_LM`` is either the data's cross-entropy or,
for self-distillation, ``KL(target with adapters disabled || adapted target)``, and ``lambda_t`` is
warmed up (``head_loss_scale``, set before each optimizer step by the method's ``on_step`` hook, and
logged). Heads' soft labels come from the adapted model's own (detached) logits: the model they will
be verified against.

Only positions whose label is an assistant token are projected to the vocabulary, which is where
nearly all of the cost is.

Heads with a draft vocabulary ``S`` (``MedusaHeads.draft_vocab``; VocabTrim, FR-Spec, EAGLE-3's ``d2t``) score
only its ``N`` tokens. Hard labels are mapped to draft ids and a position whose label is outside ``S`` is left
out of the loss (no head could propose it); soft labels are the target's probabilities of the tokens in ``S``,
not renormalised (``losses.soft_cross_entropy_on_subset`` says why). ``out_of_vocab_fraction`` logs what the
loss leaves out: the share of label positions outside ``S`` (hard), or the mean target mass outside ``S``
(soft). Top-1 agreement and the held-out evaluation compare target ids: a reference token outside ``S`` is a
miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...drafters.draft_vocab import DraftVocabulary
from ...drafters.medusa import MedusaHeads
from ..losses import (
    hard_cross_entropy,
    head_loss_weights,
    kl_divergence,
    soft_cross_entropy,
    soft_cross_entropy_on_subset,
)

OUT_OF_VOCAB_RANK = 1 << 40  # the rank of a reference token a head with a draft vocabulary cannot propose


@dataclass
class HeadBatch:
    """What head ``k`` saw in one batch: its positions, logits, and the reference to match."""

    index: int
    rows: torch.Tensor  # (n,) batch row of each position
    positions: torch.Tensor  # (n,) position t (head k predicts token t + 2 + k)
    logits: torch.Tensor  # (n, vocab), or (n, N) over the draft vocabulary (draft ids)
    teacher_logits: torch.Tensor | None  # (n, vocab): the target's distribution for the label, when available
    labels: torch.Tensor  # (n,) data tokens x_{t+2+k} (target ids)
    draft_vocab: DraftVocabulary | None = None  # the heads' draft vocabulary, if they score one

    @property
    def reference_tokens(self) -> torch.Tensor:
        """The target's greedy choice for the label when known (what greedy verification accepts), else the data token."""
        return self.teacher_logits.argmax(-1) if self.teacher_logits is not None else self.labels

    def predicted_tokens(self) -> torch.Tensor:
        """``(n,)`` the head's top-1 tokens, as target ids."""
        top = self.logits.argmax(-1)
        return top if self.draft_vocab is None else self.draft_vocab.to_target_ids(top)

    def reference_ranks(self) -> torch.Tensor:
        """``(n,)`` rank of each reference token among the head's logits (0: its top-1). A token outside the draft
        vocabulary gets ``OUT_OF_VOCAB_RANK``, beyond every rank a head can fill: a miss at every top-k and in
        every tree."""
        reference = self.reference_tokens
        if self.draft_vocab is not None:
            reference = self.draft_vocab.to_draft_ids(reference)
        inside = reference >= 0
        chosen = self.logits.gather(-1, reference.clamp(min=0)[:, None])
        ranks = (self.logits > chosen).sum(-1)
        return torch.where(inside, ranks, torch.full_like(ranks, OUT_OF_VOCAB_RANK))


class MedusaObjective(nn.Module):
    """``forward(input_ids, attention_mask, loss_mask, hidden=None)`` -> losses and per-head top-1 agreement."""

    def __init__(self, target: nn.Module, heads: MedusaHeads, *, version: int = 1, labels: str = "soft",
                 head_loss_decay: float = 0.8, head_loss_weight: float = 0.2, lm_loss: str = "kl_to_base"):
        super().__init__()
        self.target = target
        self.heads = heads
        self.version = version
        self.labels = labels
        self.weights = head_loss_weights(heads.config.num_heads, head_loss_decay)
        self.head_loss_weight = head_loss_weight if version == 2 else 1.0
        self.lm_loss = lm_loss
        self.head_loss_scale = 1.0  # Medusa-2 warm-up factor, updated before each optimizer step

    @property
    def config(self):
        """The target's config (DeepSpeed sizes its ``auto`` buckets from ``hidden_size``)."""
        return self.target.config

    # ------------------------------------------------------------------ pieces of the target
    def _backbone(self) -> nn.Module:
        return self.target.get_decoder()

    def _lm_head(self) -> nn.Module:
        return self.target.get_output_embeddings()

    def target_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's logits from its last hidden states (with its soft-capping, if any)."""
        logits = self._lm_head()(hidden)
        cap = self.heads.config.logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def _hidden(self, input_ids, attention_mask, hidden) -> torch.Tensor:
        if hidden is not None:
            return hidden.to(self._lm_head().weight.dtype)
        if self.version == 1:
            with torch.no_grad():
                return self._backbone()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._backbone()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _base_hidden(self, input_ids, attention_mask) -> torch.Tensor:
        """Hidden states of the target with its adapters disabled (Medusa-2 self-distillation teacher)."""
        with torch.no_grad(), self.target.disable_adapter():
            return self._backbone()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # ------------------------------------------------------------------ forward
    def head_batches(self, input_ids, attention_mask, loss_mask, hidden=None, need_teacher: bool | None = None):
        """Compute the LM term (Medusa-2) and each head's logits; returns ``(lm_loss, [HeadBatch])``."""
        mask = loss_mask.bool() & attention_mask.bool()
        hidden = self._hidden(input_ids, attention_mask, hidden)
        rows, positions = mask[:, 1:].nonzero(as_tuple=True)  # positions p whose next token is a label
        row_of = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        row_of[rows, positions] = torch.arange(rows.shape[0], device=mask.device)
        need_teacher = self.labels == "soft" if need_teacher is None else need_teacher

        lm_loss = hidden.new_zeros(())
        teacher = None
        if self.version == 2:
            student = self.target_logits(hidden[rows, positions])
            if rows.numel() == 0:
                lm_loss = student.sum() * 0.0
            elif self.lm_loss == "kl_to_base":
                base_hidden = self._base_hidden(input_ids, attention_mask)
                with torch.no_grad():
                    base_logits = self.target_logits(base_hidden[rows, positions])
                lm_loss = kl_divergence(student, base_logits)
            else:
                lm_loss = hard_cross_entropy(student, input_ids[rows, positions + 1])
            teacher = student.detach()
        elif need_teacher:
            with torch.no_grad():
                teacher = self.target_logits(hidden[rows, positions])

        lm_head = self._lm_head() if self.heads.config.share_lm_head else None
        batches = []
        for k in range(self.heads.config.num_heads):
            head_rows, head_positions = mask[:, 2 + k:].nonzero(as_tuple=True)
            if head_rows.numel() == 0:  # keep every head in the graph (DDP needs a gradient for each)
                head_rows, head_positions = rows[:0], positions[:0]
            logits = self.heads.head_logits(k, hidden[head_rows, head_positions], lm_head)
            teacher_rows = row_of[head_rows, head_positions + 1 + k]
            batches.append(HeadBatch(
                index=k, rows=head_rows, positions=head_positions, logits=logits,
                teacher_logits=None if teacher is None else teacher[teacher_rows],
                labels=input_ids[head_rows, head_positions + 2 + k], draft_vocab=self.heads.draft_vocab,
            ))
        return lm_loss, batches

    def forward(self, input_ids, attention_mask, loss_mask, hidden=None) -> dict[str, torch.Tensor]:
        lm_loss, batches = self.head_batches(input_ids, attention_mask, loss_mask, hidden)
        head_losses, head_top1 = [], []
        left_out = positions = lm_loss.new_zeros((), dtype=torch.float32)
        for batch in batches:
            if batch.logits.shape[0] == 0:
                head_losses.append(batch.logits.sum() * 0.0)
                head_top1.append(batch.logits.new_zeros(()))
                continue
            loss, outside = self.head_loss(batch)
            head_losses.append(loss)
            head_top1.append((batch.predicted_tokens() == batch.reference_tokens).float().mean().detach())
            left_out = left_out + outside.sum()
            positions = positions + outside.numel()
        head_total = sum(weight * loss for weight, loss in zip(self.weights, head_losses))
        loss = lm_loss + self.head_loss_weight * self.head_loss_scale * head_total
        outputs = {
            "loss": loss,
            "lm_loss": lm_loss.detach(),
            "head_losses": torch.stack([item.detach() for item in head_losses]),
            "head_top1": torch.stack(head_top1),
            "head_loss_scale": torch.tensor(float(self.head_loss_scale), device=loss.device),
        }
        if self.heads.draft_vocab is not None:
            outputs["out_of_vocab_fraction"] = (left_out / positions.clamp(min=1)).detach()
        return outputs

    def head_loss(self, batch: HeadBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One head's loss, and per position the part of its label the loss leaves out (all zeros without a draft
        vocabulary; with one: 1 for a hard label outside it, the target's mass outside it for a soft label)."""
        vocabulary = batch.draft_vocab
        if vocabulary is None:
            if self.labels == "soft":
                loss = soft_cross_entropy(batch.logits, batch.teacher_logits)
            else:
                loss = hard_cross_entropy(batch.logits, batch.labels)
            return loss, batch.logits.new_zeros(batch.logits.shape[0], dtype=torch.float32)
        if self.labels == "soft":
            keep = vocabulary.draft_to_target_on(batch.logits.device)
            loss, kept_mass = soft_cross_entropy_on_subset(batch.logits, batch.teacher_logits, keep)
            return loss, (1.0 - kept_mass).detach()
        draft_labels = vocabulary.to_draft_ids(batch.labels)
        inside = draft_labels >= 0
        if not bool(inside.any()):  # keep the head in the graph (DDP needs a gradient for each)
            loss = batch.logits.sum() * 0.0
        else:
            loss = hard_cross_entropy(batch.logits[inside], draft_labels[inside])
        return loss, (~inside).float()
