"""The EAGLE-3 training objective with training-time test (Li et al. 2025, "EAGLE-3: Scaling up Inference
Acceleration of Large Language Models via Training-Time Test").

The draft is unrolled for ``steps`` drafting steps over every position of a sequence at once. Step 0 is what
the drafter does on verified rows: row ``t`` reads ``fc`` of the target's fused features at ``t`` and the embedding
of ``x_{t+1}`` and predicts ``x_{t+2}``. Step ``j`` is depth ``j + 1`` of a draft anchored at ``t``: row ``t`` reads the
draft's *own* output of step ``j - 1`` (not the target's features) and the embedding of ``x_{t+1+j}``, sits at
position ``t + j``, and attends to the verified prefix ``0..t`` (step 0's keys) and to its own rows of steps
``1..j`` (``DraftAttention.attend_unrolled``): exactly what it sees when drafting at inference. So the draft is
trained on the inputs it will meet, its own predictions, instead of only on target features.

Loss: soft cross-entropy from step ``j``'s logits at row ``t`` to the target's distribution of ``x_{t+2+j}`` (its
logits at position ``t + 1 + j``), on assistant positions, over the draft vocabulary (the target's probabilities of
its tokens, not renormalised: ``losses.soft_cross_entropy_on_subset``), step ``j`` weighted ``decay**j``. No feature
regression loss (EAGLE-3 drops EAGLE-1's). Teacher probabilities are computed once per position and shared by the
steps that predict it.
"""

from __future__ import annotations

import torch
from torch import nn

from ...drafters.eagle3 import Eagle3Draft
from ...engine.features import FINAL
from ..feature_cache import compute_features, feature_key
from ..losses import head_loss_weights, soft_cross_entropy_to_probs
from .step_predictions import StepPredictions, predicted_target_tokens, teacher_labels


class Eagle3Objective(nn.Module):
    """``forward(input_ids, attention_mask, loss_mask, **features)`` -> loss and per-step top-1 agreement.

    ``features`` are cached target features by ``feature_key`` (``hidden_<i>`` for each of the draft's feature
    layers and ``hidden`` for the post-norm state); when any is missing they are computed with the frozen target.
    """

    def __init__(self, target: nn.Module, draft: Eagle3Draft, *, steps: int = 3, step_decay: float = 0.8):
        super().__init__()
        if steps < 1:
            raise ValueError(f"EAGLE-3 training needs at least one drafting step, got steps={steps}.")
        self.target = target
        self.draft = draft
        self.steps = steps
        self.weights = head_loss_weights(steps, step_decay)

    @property
    def config(self):
        """The target's config (DeepSpeed sizes its ``auto`` buckets from ``hidden_size``)."""
        return self.target.config

    @property
    def feature_layers(self) -> list:
        return list(self.draft.config.feature_layers)

    # ------------------------------------------------------------------ inputs
    def _features(self, input_ids, attention_mask, given: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused feature layers ``(B, T, 3H)`` and the post-norm last hidden state ``(B, T, H)``."""
        layers = list(self.draft.config.feature_layers)
        names = [feature_key(layer) for layer in layers] + [feature_key(FINAL)]
        if not all(name in given for name in names):
            given = compute_features(self.target, input_ids, attention_mask, tuple(layers) + (FINAL,))
        dtype = self.draft.fc.weight.dtype
        fused = torch.cat([given[name] for name in names[:-1]], dim=-1).to(dtype)
        return fused, given[names[-1]]

    # ------------------------------------------------------------------ the unrolled draft
    def unrolled(self, input_ids, attention_mask, loss_mask, **features) -> list[StepPredictions]:
        """Run the ``steps`` drafting steps over the batch; per step, the predictions at positions with a label."""
        fused, final_hidden = self._features(input_ids, attention_mask, features)
        labels = teacher_labels(self.target, self.draft, final_hidden, attention_mask, loss_mask)

        batch, length = input_ids.shape
        rows = length - 1  # anchors t = 0 .. length - 2
        positions = torch.arange(rows, device=input_ids.device).expand(batch, -1)
        causal = torch.ones(rows, rows, dtype=torch.bool, device=input_ids.device).tril()
        layer, embed = self.draft.layer, self.target.get_input_embeddings()
        hidden = self.draft.fuse(fused[:, :rows])
        predictions, own_keys, own_values = [], [], []
        for step in range(self.steps):
            tokens = torch.zeros_like(input_ids[:, :rows])  # x_{t+1+step}; padding beyond the sequence
            known = max(rows - step, 0)
            tokens[:, :known] = input_ids[:, 1 + step : 1 + step + known]
            embeddings = embed(tokens).to(hidden.dtype)
            q, k, v = layer.self_attn.project(layer.attention_input(embeddings, hidden), positions + step)
            if step == 0:
                prefix_keys, prefix_values = k, v
                attended = layer.self_attn.attend(q, k, v, causal)
            else:
                own_keys.append(k)
                own_values.append(v)
                attended = layer.self_attn.attend_unrolled(q, prefix_keys, prefix_values, own_keys, own_values, causal)
            hidden = layer.finish(hidden, attended)
            batch_rows, anchors, chosen = labels.at(step)
            logits = self.draft.logits(hidden[batch_rows, anchors])
            predictions.append(StepPredictions(step, batch_rows, anchors, logits, labels.probs[chosen],
                                               labels.reference[chosen]))
        return predictions

    def predicted_tokens(self, prediction: StepPredictions) -> torch.Tensor:
        return predicted_target_tokens(self.draft, prediction.logits)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask, loss_mask, **features) -> dict[str, torch.Tensor]:
        predictions = self.unrolled(input_ids, attention_mask, loss_mask, **features)
        losses, top1 = [], []
        for prediction in predictions:
            if prediction.logits.shape[0] == 0:  # keep the draft in the graph (DDP needs a gradient for each)
                losses.append(prediction.logits.sum() * 0.0)
                top1.append(prediction.logits.new_zeros((), dtype=torch.float32))
                continue
            losses.append(soft_cross_entropy_to_probs(prediction.logits, prediction.teacher_probs))
            top1.append((self.predicted_tokens(prediction) == prediction.reference).float().mean())
        loss = sum(weight * item for weight, item in zip(self.weights, losses))
        return {"loss": loss, "step_losses": torch.stack([item.detach().float() for item in losses]),
                "step_top1": torch.stack(top1).detach()}
