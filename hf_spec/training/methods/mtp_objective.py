"""The gated-LoRA multi-token-prediction objective (Samragh et al. 2025, "Your LLM Knows the Future: Uncovering Its
Multi-Token Prediction Potential") on one interleaved forward per sequence.

Each sequence of a batch runs once through ``MTPModel`` (``hf_spec.drafters.mtp``) in the paper's masked-input layout:
its ordinary tokens plus a block of ``k`` mask tokens after each of ``A`` *anchors*, a random subset of its reply
positions (``anchors_per_sequence``: the ``k * A`` extra rows are what a step costs beyond the plain forward). An
anchor ``p`` is a position whose next token ``x_{p+1}`` is a reply token (the base model predicts it on the ordinary
row, as when decoding), and mask slot ``j`` after it predicts ``x_{p+2+j}``; a slot counts where that token exists
and is a reply token. Each sequence is cut to its real length (no padding rows) and to ``max_length`` tokens (a
causal prefix, so nothing it keeps changes).

Losses, each a mean over the counted (anchor, slot) pairs of slot ``j``, slot ``j`` weighted ``slot_decay**j``:

- ``sampler``: cross-entropy of the sampler head's logits (fed the true previous token ``x_{p+1+j}``: teacher
  forcing) to the slot's token;
- ``mask``: the same for the base ``lm_head`` on the mask latent ``z`` (the paper's mask-token prediction loss);
- ``consistency``: the paper's latent consistency, the mean squared difference between ``z`` (last hidden state
  before the final norm) of slot ``j`` after ``p`` and the *detached* ordinary hidden state ``h`` of row ``p + 1 + j``,
  which predicts the same token ``x_{p+2+j}`` (the base model's own representation is the target, never moved),
  divided by the mean square of ``h`` (a constant): the residual stream's scale differs by model and grows with
  depth (SmolLM2-135M's last one: mean square ~10^3), and relative to it one weight fits every model.

Targets: ``labels="hard"`` is the paper's, the data's token; ``labels="soft"`` the base model's own next-token
distribution at row ``p + 1 + j`` (the same forward computes it: the ordinary rows are the base model's), i.e.
self-distillation of what verification accepts.

The base model's next-token cross-entropy on the ordinary rows is only logged (``base_ce``): it has no gradient,
since the gate keeps the LoRA off the ordinary rows (they attend to ordinary rows only) and the base is frozen. It
stays the base model's value for the whole run, which is the point of the gate.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ...drafters.mtp import MTPModel

UNLABELLED = -1


@dataclass
class SequenceTerms:
    """What one sequence's forward contributes, per slot ``j`` (tensors ``(k,)``), summed over its anchors."""

    sampler: torch.Tensor
    mask: torch.Tensor
    consistency: torch.Tensor
    counted: torch.Tensor  # (anchor, slot) pairs counted
    sampler_hits: torch.Tensor  # sampler top-1 == the base model's greedy token
    base_ce_sum: torch.Tensor  # no gradient
    base_ce_count: torch.Tensor


class MTPObjective(nn.Module):
    """``forward(input_ids, attention_mask, loss_mask, **ignored)`` -> loss, per-slot terms and the logged base CE."""

    def __init__(self, mtp: MTPModel, *, anchors_per_sequence: int | None = 16, max_length: int | None = None,
                 sampler_weight: float = 1.0, mask_weight: float = 1.0, consistency_weight: float = 1.0,
                 slot_decay: float = 1.0, labels: str = "hard", eval_anchors_per_sequence: int | None = None,
                 seed: int = 0):
        super().__init__()
        if labels not in ("hard", "soft"):
            raise ValueError(f"labels must be 'hard' or 'soft', got {labels!r}.")
        self.mtp = mtp
        self.anchors_per_sequence = anchors_per_sequence
        self.eval_anchors_per_sequence = eval_anchors_per_sequence
        self.max_length = max_length
        self.weights = {"sampler": float(sampler_weight), "mask": float(mask_weight),
                        "consistency": float(consistency_weight)}
        self.slot_weights = [float(slot_decay) ** j for j in range(self.num_masks)]
        self.labels = labels
        self.seed = seed
        share_mask_embeddings_with_zero3(self, mtp)

    @property
    def config(self):
        """The base model's config (DeepSpeed sizes its ``auto`` buckets from ``hidden_size``)."""
        return self.mtp.base.config

    @property
    def num_masks(self) -> int:
        return self.mtp.config.num_mask_tokens

    # ------------------------------------------------------------------ anchors
    def sequences(self, input_ids, attention_mask, loss_mask):
        """Each row cut to its real length and ``max_length``: ``(tokens (n,), reply mask (n,))``."""
        lengths = attention_mask.long().sum(-1).tolist()
        for row, length in enumerate(lengths):
            length = min(int(length), self.max_length or int(length))
            yield input_ids[row, :length], loss_mask[row, :length].bool()

    def candidate_anchors(self, reply: torch.Tensor) -> torch.Tensor:
        """Positions ``p`` with a reply token next (``x_{p+1}``) and a slot-0 label in the sequence (``p+2 < n``)."""
        n = reply.shape[0]
        if n < 3:
            return reply.new_zeros(0, dtype=torch.long)
        return (reply[1:n - 1]).nonzero().squeeze(-1)

    def choose_anchors(self, tokens: torch.Tensor, reply: torch.Tensor, count: int | None,
                       generator: torch.Generator | None) -> tuple[list[int], bool]:
        """Up to ``count`` candidates at random (all of them for ``None``), and whether any is real. A sequence with
        none gets anchor 0 with nothing counted, so every trainable tensor still takes part in the step (DDP needs a
        gradient for each)."""
        candidates = self.candidate_anchors(reply)
        if candidates.numel() == 0:
            return [0], False
        if count is not None and candidates.numel() > count:
            order = torch.randperm(candidates.numel(), generator=generator)[:count]
            candidates = candidates[order.to(candidates.device)]
        return sorted(candidates.tolist()), True

    def evaluation_generator(self, tokens: torch.Tensor) -> torch.Generator:
        """Held-out anchors depend on the sequence and the seed only (not on the launch layout or the order)."""
        digest = zlib.crc32(tokens.detach().cpu().numpy().tobytes())
        return torch.Generator().manual_seed((digest << 16) ^ self.seed)

    # ------------------------------------------------------------------ one sequence
    def sequence_outputs(self, tokens: torch.Tensor, reply: torch.Tensor, anchors: list[int], real: bool):
        """One interleaved forward; per (anchor, slot): the sampler / mask logits, the latent and its consistency
        target, the data token, the base model's distribution of that token and which pairs count."""
        out = self.mtp(tokens[None], anchors)
        n, k = tokens.shape[0], self.num_masks
        anchor = torch.tensor(anchors, device=tokens.device)[:, None]
        slots = torch.arange(k, device=tokens.device)[None]
        label_at = anchor + 2 + slots  # (A, k): the position of x_{p+2+j}
        inside = label_at < n
        counted = inside & reply[label_at.clamp(max=n - 1)] & real
        same_token_row = (anchor + 1 + slots).clamp(max=n - 1)  # the ordinary row that predicts x_{p+2+j}
        base_logits = out.logits[0, same_token_row].detach()  # (A, k, V): the base model's, whatever the adapter
        return {
            "sampler_logits": out.sampler_logits[0],
            "mask_logits": out.mask_logits[0],
            "mask_hidden": out.mask_hidden[0],
            "consistency_target": out.hidden[0, same_token_row].detach(),
            "labels": torch.where(counted, out.mask_labels[0], torch.zeros_like(out.mask_labels[0])),
            "base_logits": base_logits,
            "counted": counted,
            "ordinary_logits": out.logits[0],
            "ordinary_labels": out.labels[0],
            "reply": reply,
        }

    def sequence_terms(self, outputs: dict) -> SequenceTerms:
        """Per-slot sums of the three losses over the counted pairs (uncounted pairs stay in the graph at weight 0)."""
        counted = outputs["counted"].float()
        base_logits = outputs["base_logits"].float()
        if self.labels == "soft":
            teacher = torch.softmax(base_logits, dim=-1)

            def cross_entropy(logits):
                return -(teacher * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
        else:
            def cross_entropy(logits):
                flat = F.cross_entropy(logits.float().flatten(0, 1), outputs["labels"].flatten(), reduction="none")
                return flat.view(counted.shape)
        sampler = (cross_entropy(outputs["sampler_logits"]) * counted).sum(0)
        mask = (cross_entropy(outputs["mask_logits"]) * counted).sum(0)
        target = outputs["consistency_target"].float()
        squared_error = (outputs["mask_hidden"].float() - target).pow(2).mean(-1)
        consistency = (squared_error / target.pow(2).mean(-1).clamp(min=1e-6) * counted).sum(0)
        reference = base_logits.argmax(-1)
        hits = ((outputs["sampler_logits"].detach().argmax(-1) == reference).float() * counted).sum(0)
        with torch.no_grad():
            reply, labels = outputs["reply"], outputs["ordinary_labels"]
            scored = torch.zeros_like(reply)
            scored[:-1] = reply[1:]  # ordinary row i predicts x_{i+1}: scored when that is a reply token
            scored &= labels >= 0
            base_ce = F.cross_entropy(outputs["ordinary_logits"][scored].float(), labels[scored], reduction="sum")
        return SequenceTerms(sampler, mask, consistency, counted.sum(0), hits, base_ce, scored.sum().float())

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask, loss_mask, **features) -> dict[str, torch.Tensor]:
        terms = []
        for tokens, reply in self.sequences(input_ids, attention_mask, loss_mask):
            anchors, real = self.choose_anchors(tokens, reply, self.anchors_per_sequence, None)  # global RNG: resumable
            terms.append(self.sequence_terms(self.sequence_outputs(tokens, reply, anchors, real)))
        return self.combine(terms)

    def combine(self, terms: list[SequenceTerms]) -> dict[str, torch.Tensor]:
        def total(name):
            return torch.stack([getattr(term, name) for term in terms]).sum(0)

        counted = total("counted")
        per_pair = counted.clamp(min=1)
        slot_weights = torch.tensor(self.slot_weights, device=counted.device)
        means = {name: total(name) / per_pair for name in ("sampler", "mask", "consistency")}
        loss = sum(weight * (slot_weights * means[name]).sum() for name, weight in self.weights.items())
        return {
            "loss": loss,
            "sampler_ce": means["sampler"].detach(),
            "mask_ce": means["mask"].detach(),
            "consistency": means["consistency"].detach(),
            "sampler_top1": (total("sampler_hits") / per_pair).detach(),
            "base_ce": (total("base_ce_sum") / total("base_ce_count").clamp(min=1)).detach(),
            "pairs": counted.sum().detach(),
        }

    # ------------------------------------------------------------------ held-out evaluation
    @torch.no_grad()
    def slot_hits(self, input_ids, attention_mask, loss_mask, **features) -> torch.Tensor:
        """``(B, L, 2k)``: at each evaluated anchor, per slot, whether the sampler's top-1 is the base model's greedy
        token (first ``k``) and the data's token (last ``k``); ``UNLABELLED`` elsewhere."""
        k = self.num_masks
        hits = torch.full((*input_ids.shape, 2 * k), UNLABELLED, dtype=torch.long, device=input_ids.device)
        for row, (tokens, reply) in enumerate(self.sequences(input_ids, attention_mask, loss_mask)):
            anchors, real = self.choose_anchors(tokens, reply, self.eval_anchors_per_sequence,
                                                self.evaluation_generator(tokens))
            outputs = self.sequence_outputs(tokens, reply, anchors, real)  # always run: ZeRO-3 ranks forward together
            if not real:
                continue
            predicted = outputs["sampler_logits"].argmax(-1)
            greedy = (predicted == outputs["base_logits"].argmax(-1)).long()
            data = (predicted == outputs["labels"]).long()
            counted = outputs["counted"]
            anchor = torch.tensor(anchors, device=input_ids.device)
            hits[row, anchor] = torch.where(torch.cat([counted, counted], -1), torch.cat([greedy, data], -1),
                                            UNLABELLED)
        return hits


def share_mask_embeddings_with_zero3(objective: nn.Module, mtp: MTPModel) -> None:
    """Under DeepSpeed ZeRO-3, register ``mtp.mask_embeddings`` as an external parameter of the objective.

    ZeRO-3 gathers a module's own parameters around its forward and, in backward, when a gradient reaches a tensor
    the module returned. ``MTPModel`` returns an ``MTPOutput`` dataclass, whose tensors DeepSpeed cannot see, so
    the mask embeddings (``MTPModel``'s only direct parameter) would be partitioned again when their gradient
    arrives. The objective returns a dict of tensors: tied to it, they stay gathered for the whole backward. A no-op
    unless DeepSpeed is loaded (the launch imports it before ``build``)."""
    if "deepspeed" not in sys.modules:
        return
    import deepspeed

    deepspeed.zero.register_external_parameter(objective, mtp.mask_embeddings)


@torch.no_grad()
def evaluate_slots(accelerator, objective, dataloader, max_batches: int | None = None) -> dict:
    """Held-out top-1 of the sampler per mask slot, and the chain tau it implies.

    Slot ``j`` after anchor ``p`` is right when the sampler's top-1 (fed the data's token ``x_{p+1+j}``) is the base
    model's greedy token for ``x_{p+2+j}`` (its argmax at row ``p + 1 + j``: what greedy verification accepts);
    ``slot_top1_data`` compares with the data's token instead. ``tau_chain`` is 1 + the mean number of leading
    right slots per anchor (the base model's own token plus the accepted drafts of a top-1 chain of ``k``, had every
    earlier draft been accepted: the mask latents never read the drafts, and teacher forcing then feeds the sampler
    exactly the drafted token); ``tau_expected`` is ``1 + sum_j prod_{i <= j} top1_i`` from the per-slot accuracies.
    Per-anchor hits are gathered with ``gather_for_metrics`` (padded duplicates of an uneven last batch count once).
    ``max_batches`` bounds the batches per process (the same count on every rank).
    """
    model = accelerator.unwrap_model(objective)
    was_training = objective.training
    objective.eval()
    k = model.num_masks
    gathered = []
    for index, batch in enumerate(dataloader):
        if max_batches is not None and index >= max_batches:
            break
        hits = model.slot_hits(**batch)
        hits = accelerator.pad_across_processes(hits, dim=1, pad_index=UNLABELLED)
        hits = accelerator.gather_for_metrics(hits).cpu().flatten(0, 1)
        gathered.append(hits[(hits != UNLABELLED).any(-1)])
    objective.train(was_training)
    hits = torch.cat(gathered) if gathered else torch.empty(0, 2 * k, dtype=torch.long)

    def accuracy(column):
        values = hits[:, column]
        labelled = values >= 0
        return float((values[labelled] == 1).float().mean()) if bool(labelled.any()) else 0.0

    top1 = [accuracy(j) for j in range(k)]
    top1_data = [accuracy(k + j) for j in range(k)]
    anchored = hits[hits[:, 0] >= 0][:, :k]
    leading = (anchored == 1).long().cumprod(-1).sum(-1)
    expected, running = 1.0, 1.0
    for value in top1:
        running *= value
        expected += running
    return {
        "anchors": int(anchored.shape[0]),
        "slot_top1": top1,
        "slot_top1_data": top1_data,
        "slots": [{"slot": j, "drafts_depth": j + 1, "predicts": f"x[p+{j + 2}]", "top1": top1[j],
                   "top1_data": top1_data[j]} for j in range(k)],
        "tau_chain": 1.0 + float(leading.float().mean()) if anchored.shape[0] else 1.0,
        "tau_expected": expected,
    }
