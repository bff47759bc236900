"""The Falcon training objective with Coupled Sequential Glancing Distillation (Gao et al. 2024, "Falcon: Faster
and Parallel Inference of Large Language Models through Enhanced Semi-Autoregressive Drafting and Custom-Designed
Decoding Tree"), every block of a sequence at once.

Rows ``p = 0 .. T-2`` pair the target's post-norm feature ``f_p`` with the token ``x_{p+1}``, in blocks of ``k``
(``p // k``). **Pass 0** runs the LSTM over the rows and the decoder layer with the relaxed causal mask: row ``p``
predicts ``f_{p+k}`` and ``x_{p+k+1}``. A block ending at ``t`` is what the drafter holds after verifying ``x_{t+1}``:
its rows draft depths ``1..k`` from anchor ``t``. **Pass n** (``n >= 1``) is the drafter's ``n``-th pass from that
anchor: the block at positions ``t + 1 + (n-1)k ..`` reads the features pass ``n - 1`` predicted for it (its own
outputs, detached: the paper's no-grad pass) and the data's tokens, continues the LSTM from the previous block's
state (detached too), attends to the verified prefix ``0..t`` and to the anchor's earlier pass blocks and itself,
and predicts depths ``nk + 1 .. (n+1)k``. This is exactly what ``FalconDrafter`` computes on the accepted path.

**Glancing** (training only): per sequence, the Hamming distance between pass 0's top-1 tokens and the target's
(over labelled rows) sets how many rows ``N = ratio * distance`` of each later pass read the target's true feature
instead of the predicted one (chosen at random; the ratio is annealed over training, 0.45 -> 0.1 in the paper):
where the drafter is often wrong it gets more help. Loss per drafted depth: ``feature_loss_weight`` x SmoothL1 to
the target's feature plus ``token_loss_weight`` x soft cross-entropy to the target's distribution over the draft
vocabulary (the KL term of the paper's ``0.9 KL + 0.1 CE``; with self-distilled data the hard label is a sample of
that same distribution), pass ``n`` weighted ``decay**n``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...drafters.falcon import FalconDraft
from ...drafters.falcon.layer import relaxed_causal_mask
from ...engine.features import FINAL
from ..feature_cache import compute_features, feature_key
from ..losses import soft_cross_entropy_to_probs
from .step_predictions import StepPredictions, predicted_target_tokens, teacher_labels


class FalconObjective(nn.Module):
    """``forward(input_ids, attention_mask, loss_mask, **features)`` -> loss, per-depth losses and top-1 agreement."""

    def __init__(self, target: nn.Module, draft: FalconDraft, *, passes: int = 2, pass_decay: float = 0.8,
                 feature_loss_weight: float = 1.0, token_loss_weight: float = 0.1, glance_ratio: float = 0.0):
        super().__init__()
        if passes < 1:
            raise ValueError(f"Falcon training needs at least one pass, got passes={passes}.")
        self.target = target
        self.draft = draft
        self.block = draft.config.block_size
        self.passes = passes
        self.steps = passes * self.block
        self.weights = [pass_decay ** (step // self.block) for step in range(self.steps)]
        self.feature_loss_weight = feature_loss_weight
        self.token_loss_weight = token_loss_weight
        self.glance_ratio = glance_ratio  # set per optimizer step by the method's on_step (annealed)

    @property
    def config(self):
        """The target's config (DeepSpeed sizes its ``auto`` buckets from ``hidden_size``)."""
        return self.target.config

    @property
    def feature_layers(self) -> list:
        return [FINAL]

    def _features(self, input_ids, attention_mask, given: dict) -> torch.Tensor:
        name = feature_key(FINAL)
        if name not in given:
            given = compute_features(self.target, input_ids, attention_mask, (FINAL,))
        return given[name]

    # ------------------------------------------------------------------ the passes
    def unrolled(self, input_ids, attention_mask, loss_mask, **features) -> list[StepPredictions]:
        """Each drafted depth's predictions at the anchors (block ends) whose label exists."""
        final_hidden = self._features(input_ids, attention_mask, features)
        labels = teacher_labels(self.target, self.draft, final_hidden, attention_mask, loss_mask)
        draft, k = self.draft, self.block
        dtype = draft.lm_head.weight.dtype
        target_features = final_hidden.to(dtype)
        batch, length = input_ids.shape
        rows = length - 1
        device = input_ids.device
        positions = torch.arange(rows, device=device).expand(batch, -1)
        embed = self.target.get_input_embeddings()

        lstm_inputs = draft.lstm_inputs(embed(input_ids[:, 1:]).to(dtype), target_features[:, :rows])
        hidden, _ = draft.lstm(lstm_inputs)
        q, prefix_keys, prefix_values = draft.layer.project(hidden, positions)
        prefix_allowed = relaxed_causal_mask(rows, k, device)
        outputs = draft.layer.finish(hidden, draft.layer.attend(q, prefix_keys, prefix_values, prefix_allowed))
        predictions = self._predictions(0, outputs, target_features, labels)

        block_ends = ((torch.arange(rows, device=device) // k) * k + k - 1).clamp(max=rows - 1)
        cells = draft.lstm.cells(lstm_inputs, hidden)  # the LSTM state after each anchor, detached like the features
        state = (hidden.detach()[:, block_ends], cells[:, block_ends])
        own_keys, own_values = [], []
        glance = self._glance_rows(predictions, batch, rows, length, device) if self.training else None
        for n in range(1, self.passes):
            shift = n * k  # pass n's row p sits at position p + shift and reads x_{p + shift + 1}
            features_in = outputs.detach()
            if glance is not None:
                truth = target_features[:, shift : shift + rows]
                usable = glance[:, : truth.shape[1]]
                features_in = features_in.clone()
                features_in[:, : truth.shape[1]][usable] = truth[usable]
            tokens = torch.zeros_like(input_ids[:, :rows])
            known = max(rows - shift, 0)
            tokens[:, :known] = input_ids[:, 1 + shift : 1 + shift + known]
            hidden, state = self._blocked_recur(embed(tokens).to(dtype), features_in, state)
            q, keys, values = draft.layer.project(hidden, positions + shift)
            own_keys.append(self._block_mates(keys))
            own_values.append(self._block_mates(values))
            mates = torch.cat(own_keys, dim=3), torch.cat(own_values, dim=3)
            mate_index = (torch.arange(rows, device=device) // k * k)[:, None] + torch.arange(k, device=device)
            own_allowed = (mate_index < rows).repeat(1, n)
            attended = draft.layer.attend_split(q, prefix_keys, prefix_values, prefix_allowed, mates[0], mates[1],
                                                own_allowed)
            outputs = draft.layer.finish(hidden, attended)
            predictions += self._predictions(n, outputs, target_features, labels)
        return predictions

    def _blocked_recur(self, embeddings, features, state):
        """LSTM over each block of ``k`` rows from its own start state (``state``: ``(B, R, H)`` pairs, the state after
        the block's anchor or after the same block in the previous pass); returns the rows and, per row, its block's
        end state."""
        k = self.block
        batch, rows, size = embeddings.shape
        padded = -(-rows // k) * k
        blocks = padded // k
        pad = lambda x: F.pad(x, (0, 0, 0, padded - rows)).reshape(batch * blocks, k, size)  # noqa: E731
        starts = torch.arange(0, padded, k, device=embeddings.device).clamp(max=rows - 1)
        start_state = tuple(part[:, starts].reshape(batch * blocks, size) for part in state)
        hidden, end_state = self.draft.recur(pad(embeddings), pad(features), start_state)
        block_of_row = torch.arange(rows, device=embeddings.device) // k
        end_state = tuple(part.reshape(batch, blocks, size)[:, block_of_row] for part in end_state)
        return hidden.reshape(batch, padded, size)[:, :rows], end_state

    def _block_mates(self, keys: torch.Tensor) -> torch.Tensor:
        """``(B, heads, R, d)`` -> ``(B, heads, R, k, d)``: for each row, the keys of its block's ``k`` rows."""
        k = self.block
        rows = keys.shape[2]
        padded = -(-rows // k) * k
        blocks = F.pad(keys, (0, 0, 0, padded - rows)).unflatten(2, (padded // k, k))
        return blocks[:, :, torch.arange(rows, device=keys.device) // k]

    @torch.no_grad()
    def _glance_rows(self, pass0: list[StepPredictions], batch: int, rows: int, length: int, device) -> torch.Tensor:
        """``(B, R)``: rows whose later-pass feature is the target's (``ratio`` x pass 0's mistakes per sequence)."""
        mistakes = torch.zeros(batch, device=device)
        for prediction in pass0:
            wrong = (self.predicted_tokens(prediction) != prediction.reference).float()
            mistakes.index_add_(0, prediction.rows, wrong)
        count = (self.glance_ratio * mistakes).round().long()
        scores = torch.rand(batch, rows, device=device)
        scores[:, max(length - 1 - self.block, 0):] = -1.0  # no true feature there
        ranks = scores.argsort(dim=1, descending=True).argsort(dim=1)
        return ranks < count[:, None]

    def _predictions(self, n: int, outputs, target_features, labels) -> list[StepPredictions]:
        """Pass ``n``'s predictions for depths ``nk + 1 .. (n+1)k`` at the anchors ``t`` that end a block: row
        ``t - k + 1 + m`` drafts depth ``nk + m + 1``, the token at ``t + 2 + nk + m`` and the feature before it."""
        k = self.block
        found = []
        for m in range(k):
            step = n * k + m
            rows, anchors, chosen = labels.at(step)
            ends_block = anchors % k == k - 1
            rows, anchors, chosen = rows[ends_block], anchors[ends_block], chosen[ends_block]
            row_index = anchors - k + 1 + m
            predicted = outputs[rows, row_index]
            truth = target_features[rows, anchors + 1 + step]
            feature_loss = F.smooth_l1_loss(predicted.float(), truth.float()) if rows.numel() else None
            found.append(StepPredictions(step, rows, anchors, self.draft.logits(predicted), labels.probs[chosen],
                                         labels.reference[chosen], feature_loss))
        return found

    def predicted_tokens(self, prediction: StepPredictions) -> torch.Tensor:
        return predicted_target_tokens(self.draft, prediction.logits)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask, loss_mask, **features) -> dict[str, torch.Tensor]:
        predictions = self.unrolled(input_ids, attention_mask, loss_mask, **features)
        losses, feature_losses, top1 = [], [], []
        for prediction in predictions:
            if prediction.logits.shape[0] == 0:  # keep the drafter in the graph (DDP needs a gradient for each)
                zero = prediction.logits.new_zeros((), dtype=torch.float32)
                losses.append(prediction.logits.sum() * 0.0)
                feature_losses.append(zero)
                top1.append(zero)
                continue
            token_loss = soft_cross_entropy_to_probs(prediction.logits, prediction.teacher_probs)
            losses.append(self.feature_loss_weight * prediction.feature_loss + self.token_loss_weight * token_loss)
            feature_losses.append(prediction.feature_loss.detach())
            top1.append((self.predicted_tokens(prediction) == prediction.reference).float().mean())
        loss = sum(weight * item for weight, item in zip(self.weights, losses))
        return {"loss": loss, "step_losses": torch.stack([item.detach().float() for item in losses]),
                "feature_losses": torch.stack([item.float() for item in feature_losses]),
                "step_top1": torch.stack(top1).detach(),
                "glance_ratio": torch.tensor(float(self.glance_ratio) if self.training else 0.0)}
