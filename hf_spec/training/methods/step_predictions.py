"""What a drafter unrolled over its drafting steps predicts in training, and the held-out evaluation of it.

Objectives of autoregressive drafters (EAGLE-3, Clover-2) expose ``unrolled(**batch) -> list[StepPredictions]``
(one per drafting step: the logits at the anchors that have a label), ``steps``, ``predicted_tokens``, ``draft``
(with ``draft_vocab``) and ``feature_layers``; ``evaluate_steps`` scores any of them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNLABELLED = -1


@dataclass
class TeacherLabels:
    """The positions a drafter is trained to predict and what the target says about them.

    ``index_of[b, p]`` is the label number of position ``p`` of row ``b`` (``UNLABELLED`` where there is none);
    ``probs[i]`` the target's probabilities of the draft vocabulary's tokens there, ``reference[i]`` its greedy token.
    """

    index_of: torch.Tensor
    probs: torch.Tensor
    reference: torch.Tensor

    def at(self, step: int):
        """``(rows, anchors, label numbers)`` of the anchors ``t`` whose position ``t + 2 + step`` has a label."""
        label_index = self.index_of[:, 2 + step:]
        rows, anchors = (label_index >= 0).nonzero(as_tuple=True)
        return rows, anchors, label_index[rows, anchors]


@torch.no_grad()
def teacher_labels(target, draft, final_hidden, attention_mask, loss_mask) -> TeacherLabels:
    """Labels at the assistant positions ``p >= 2`` (a label needs an anchor ``t = p - 2 >= 0``): the target's
    distribution of the token there, from its post-norm state one position earlier through its ``lm_head`` (with
    ``draft.config.logit_softcapping``), restricted to ``draft.draft_vocab`` when there is one (not renormalised)."""
    label_mask = loss_mask.bool() & attention_mask.bool()
    label_mask[:, :2] = False
    rows, positions = label_mask.nonzero(as_tuple=True)
    lm_head = target.get_output_embeddings()
    logits = lm_head(final_hidden[rows, positions - 1].to(lm_head.weight.dtype)).float()
    cap = draft.config.logit_softcapping
    if cap:
        logits = cap * torch.tanh(logits / cap)
    probs = torch.softmax(logits, dim=-1)
    reference = probs.argmax(-1)
    if draft.draft_vocab is not None:
        probs = probs.index_select(-1, draft.draft_vocab.draft_to_target_on(probs.device))
    index_of = torch.full(label_mask.shape, UNLABELLED, dtype=torch.long, device=label_mask.device)
    index_of[rows, positions] = torch.arange(rows.shape[0], device=label_mask.device)
    return TeacherLabels(index_of, probs, reference)


def predicted_target_tokens(draft, logits: torch.Tensor) -> torch.Tensor:
    """The draft's top-1 of ``logits`` as target ids (mapped back from its draft vocabulary, if any)."""
    top = logits.argmax(-1)
    return top if draft.draft_vocab is None else draft.draft_vocab.to_target_ids(top)


@dataclass
class StepPredictions:
    """Step ``j``'s logits at the rows with a label, and what the target says about those labels."""

    step: int
    rows: torch.Tensor  # (n,) batch row
    anchors: torch.Tensor  # (n,) anchor t (the last verified position); the row predicts x_{t+2+step}
    logits: torch.Tensor  # (n, N) over the draft vocabulary (draft ids), or (n, V)
    teacher_probs: torch.Tensor  # (n, N): the target's probabilities of the draft vocabulary's tokens
    reference: torch.Tensor  # (n,) the target's greedy token (target ids)
    feature_loss: torch.Tensor | None = None  # methods that regress the target's features (Clover-2)


@torch.no_grad()
def evaluate_steps(accelerator, objective, dataloader) -> dict:
    """Held-out top-1 agreement with the target per drafting step, teacher-forced, and the chain tau it implies.

    Step ``j`` at an anchor is right when the draft's top-1 is the target's greedy token ``j + 2`` positions ahead,
    having read its own outputs of the earlier steps and the data's tokens. ``tau_chain`` is 1 + the mean number of
    leading steps that are right per anchor: the tokens per step of a top-1 chain of ``objective.steps`` drafts,
    had every earlier draft been accepted. Per-anchor hits are gathered with
    ``gather_for_metrics`` (padded duplicates of an uneven last batch count once).
    """
    model = accelerator.unwrap_model(objective)
    was_training = objective.training
    objective.eval()
    gathered = []
    for batch in dataloader:
        predictions = model.unrolled(**batch)
        hits = torch.full((*batch["input_ids"].shape, model.steps), UNLABELLED, dtype=torch.long,
                          device=accelerator.device)
        for prediction in predictions:
            right = (model.predicted_tokens(prediction) == prediction.reference).long()
            hits[prediction.rows, prediction.anchors, prediction.step] = right
        hits = accelerator.pad_across_processes(hits, dim=1, pad_index=UNLABELLED)
        hits = accelerator.gather_for_metrics(hits).cpu()
        gathered.append(hits.flatten(0, 1)[(hits.flatten(0, 1) != UNLABELLED).any(-1)])
    objective.train(was_training)
    hits = torch.cat(gathered) if gathered else torch.empty(0, model.steps, dtype=torch.long)
    step_top1 = [float((hits[:, j][hits[:, j] >= 0] == 1).float().mean()) if bool((hits[:, j] >= 0).any()) else 0.0
                 for j in range(model.steps)]
    anchored = hits[hits[:, 0] >= 0]
    leading = (anchored == 1).long().cumprod(-1).sum(-1)
    evaluation = {
        "positions": int(anchored.shape[0]),
        "step_top1": step_top1,
        "steps": [{"step": j, "drafts_depth": j + 1, "top1": value} for j, value in enumerate(step_top1)],
        "tau_chain": 1.0 + float(leading.float().mean()) if anchored.shape[0] else 1.0,
        "feature_layers": list(model.feature_layers),
    }
    vocabulary = model.draft.draft_vocab
    if vocabulary is not None:
        evaluation["draft_vocab"] = {**vocabulary.metadata, "size": vocabulary.size,
                                     "target_vocab_size": vocabulary.target_vocab_size}
    return evaluation
