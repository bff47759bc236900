"""The Clover-2 training objective (Xiao et al. 2024, "Clover-2: Accurate Inference for Regressive Lightweight
Speculative Decoding"), every anchor of a sequence at once.

At anchor ``t`` the first state is the target's last pre-norm hidden state ``h_t``; head ``i`` runs on the previous
head's state (its own output, as when drafting), reads the embeddings of ``x_{t+1} .. x_{t+1+i}`` (the data's
tokens: teacher-forced) through the regressive connection and the target's features ``h_0 .. h_t`` through the
attention decoder, and sits at position ``t + 1 + i``. Its state regresses ``h_{t+1+i}`` (SmoothL1, weighted
``feature_loss_weight``) and its logits are pulled to the target's distribution of ``x_{t+2+i}`` (soft
cross-entropy over the draft vocabulary); head ``i`` weighted ``decay**i``. Positions with a label are the
assistant tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...drafters.clover import CloverHeads
from ...engine.features import FINAL
from ..feature_cache import compute_features, feature_key
from ..losses import head_loss_weights, soft_cross_entropy_to_probs
from .step_predictions import StepPredictions, predicted_target_tokens, teacher_labels


class CloverObjective(nn.Module):
    """``forward(input_ids, attention_mask, loss_mask, **features)`` -> loss, per-head losses and top-1 agreement."""

    def __init__(self, target: nn.Module, heads: CloverHeads, *, decay: float = 0.7, feature_loss_weight: float = 10.0):
        super().__init__()
        self.target = target
        self.draft = heads
        self.steps = heads.config.num_heads
        self.weights = head_loss_weights(self.steps, decay)
        self.feature_loss_weight = feature_loss_weight

    @property
    def config(self):
        """The target's config (DeepSpeed sizes its ``auto`` buckets from ``hidden_size``)."""
        return self.target.config

    @property
    def feature_layers(self) -> list:
        return [self.draft.config.feature_layer]

    def _features(self, input_ids, attention_mask, given: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's last hidden state before ``(B, T, H)`` and after its final norm."""
        names = [feature_key(self.draft.config.feature_layer), feature_key(FINAL)]
        if not all(name in given for name in names):
            given = compute_features(self.target, input_ids, attention_mask, (self.draft.config.feature_layer, FINAL))
        dtype = self.draft.lm_head.weight.dtype
        return given[names[0]].to(dtype), given[names[1]]

    def unrolled(self, input_ids, attention_mask, loss_mask, **features) -> list[StepPredictions]:
        """Each head's predictions at the anchors whose label exists, and its feature-regression loss inputs."""
        hidden, final_hidden = self._features(input_ids, attention_mask, features)
        labels = teacher_labels(self.target, self.draft, final_hidden, attention_mask, loss_mask)

        batch, length = input_ids.shape
        device = input_ids.device
        heads = self.draft
        key_positions = torch.arange(length, device=device).expand(batch, -1)
        prefix_keys, prefix_values = heads.decoder.prefix_keys(hidden, key_positions)
        embeddings = self.target.get_input_embeddings()(input_ids).to(hidden.dtype)
        token_keys, token_values = heads.regressive.token_keys(embeddings, key_positions)
        anchors = torch.arange(length - 1, device=device)  # t = 0 .. length - 2
        keys = torch.arange(length, device=device)
        prefix_allowed = keys[None, :] <= anchors[:, None]
        state = hidden[:, : length - 1]
        predictions = []
        for head in range(self.steps):
            newest = (anchors + 1 + head).clamp(max=length - 1)  # x_{t+1+head}, or the last token past the end
            token_allowed = (keys[None, :] >= anchors[:, None] + 1) & (keys[None, :] <= newest[:, None])
            state = heads.step(state, newest.expand(batch, -1), token_keys, token_values, token_allowed, prefix_keys,
                               prefix_values, prefix_allowed)
            predictions.append(self._predictions(head, state, hidden, labels))
        return predictions

    def _predictions(self, head, state, hidden, labels) -> StepPredictions:
        rows, anchors, chosen = labels.at(head)
        feature_loss = (F.smooth_l1_loss(state[rows, anchors].float(), hidden[rows, anchors + 1 + head].float())
                        if rows.numel() else None)
        return StepPredictions(head, rows, anchors, self.draft.logits(head, state[rows, anchors]),
                               labels.probs[chosen], labels.reference[chosen], feature_loss)

    def predicted_tokens(self, prediction: StepPredictions) -> torch.Tensor:
        return predicted_target_tokens(self.draft, prediction.logits)

    def forward(self, input_ids, attention_mask, loss_mask, **features) -> dict[str, torch.Tensor]:
        predictions = self.unrolled(input_ids, attention_mask, loss_mask, **features)
        losses, feature_losses, top1 = [], [], []
        for prediction in predictions:
            if prediction.logits.shape[0] == 0:  # keep every head in the graph (DDP needs a gradient for each)
                losses.append(prediction.logits.sum() * 0.0)
                feature_losses.append(prediction.logits.new_zeros((), dtype=torch.float32))
                top1.append(prediction.logits.new_zeros((), dtype=torch.float32))
                continue
            feature_losses.append(prediction.feature_loss)
            losses.append(soft_cross_entropy_to_probs(prediction.logits, prediction.teacher_probs)
                          + self.feature_loss_weight * prediction.feature_loss)
            top1.append((self.predicted_tokens(prediction) == prediction.reference).float().mean())
        loss = sum(weight * item for weight, item in zip(self.weights, losses))
        return {"loss": loss, "head_losses": torch.stack([item.detach().float() for item in losses]),
                "feature_losses": torch.stack([item.detach().float() for item in feature_losses]),
                "step_top1": torch.stack(top1).detach()}
