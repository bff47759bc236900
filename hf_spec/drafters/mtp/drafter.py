"""``MTPDrafter``: self-speculative decoding with a gated-LoRA multi-token prediction adapter (Samragh et al. 2025,
"Your LLM Knows the Future: Uncovering Its Multi-Token Prediction Potential").

One model, one forward per step. The verification forward runs the root and this step's draft tokens as usual and,
appended after them (``hf_spec.engine.appended_rows``), a block of ``k`` mask tokens after the root and after each
draft token: the paper's *quadratic decoding*. The LoRA gate is open on the mask rows only, so the ordinary rows are
the base model's own forward and verification is the engine's usual lossless rule. Whatever prefix the target
accepts, the block after the last accepted token has seen exactly the committed sequence; its ``k`` hidden states
are the next step's draft latents. The sampler head turns them into a chain: slot ``j``'s token is drawn from
``sampler(E[previous token], z_j)``, the previous token being the target's own next token for slot 0 and slot
``j - 1``'s draft after that. Mask rows never enter the KV cache: the engine keeps only accepted block rows.

``decoding="linear"`` appends one block, after the last draft token only (the paper's linear decoding): fewer rows
per forward, but a step that rejects any draft leaves the next step without drafts.

The first step of a ``generate()`` call has no latents yet and drafts nothing (its forward computes them). Under
the cost-aware draft length, a step after which the engine does not expect to draft appends no block: when no depth
pays, MTP costs plain decoding plus the policy's occasional probes, not a mask block per step.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ...engine.appended_rows import AppendedRows
from ...engine.tree import DraftTree
from ...errors import UnsupportedError
from ..base import Drafter, DraftRequest, StepOutcome
from .model import MTPModel, capture_final_hidden

DECODING = ("quadratic", "linear")


class MTPDrafter(Drafter):
    """Drafts with the target's own mask-token predictions through a gated-LoRA MTP adapter.

    Args:
        mtp: an ``MTPModel`` whose base model is the target: generate with ``mtp.base`` (``drafter.model``).
        num_tokens: drafts per step under ``draft_length="fixed"`` (default: all ``k`` mask slots); under the
            default ``"goodput"`` the engine chooses each step's depth, up to ``k``.
        decoding: ``"quadratic"`` (a mask block after the root and after every draft token) or ``"linear"``
            (after the last one only).
    """

    wraps_target = True  # building one wraps the target's linears in place (gate closed: the same function)

    def __init__(self, mtp: MTPModel, num_tokens: int | None = None, decoding: str = "quadratic"):
        super().__init__()
        slots = mtp.config.num_mask_tokens
        if num_tokens is not None and (isinstance(num_tokens, bool) or not isinstance(num_tokens, int)
                                       or not 1 <= num_tokens <= slots):
            raise ValueError(f"num_tokens must be an integer in [1, {slots}] (the adapter's mask slots), got "
                             f"{num_tokens!r}.")
        if decoding not in DECODING:
            raise ValueError(f"decoding must be one of {DECODING}, got {decoding!r}.")
        self.mtp = mtp.eval()
        self.num_tokens = num_tokens or slots
        self.decoding = decoding
        self._latents: torch.Tensor | None = None  # (k, hidden): the mask block after the last committed token
        self._blocks: dict[int, torch.Tensor] = {}  # this step's mask blocks, by the block row they follow

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, target, *, num_tokens: int | None = None,
                        decoding: str = "quadratic", revision: str | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> MTPDrafter:
        """Load an adapter (folder or Hub id) onto ``target``, the base model it was trained for, and build the drafter.

        ``target`` is wrapped in place by gated LoRA layers whose gate stays closed outside this drafter's forwards,
        so it keeps computing exactly what it computed before; generate with it:
        ``target.generate(**inputs, assistant_model=drafter)``. (``hf_spec.accelerate_for_cpu`` may be applied
        before or after.)
        """
        mtp = MTPModel.from_pretrained(path_or_id, target, revision=revision, token=token,
                                       local_files_only=local_files_only)
        return cls(mtp, num_tokens=num_tokens, decoding=decoding)

    @property
    def model(self):
        """The target: the base model the adapter wraps."""
        return self.mtp.base

    def begin(self, target, input_ids, generation_config, logits_processor, **options) -> None:
        super().begin(target, input_ids, generation_config, logits_processor, **options)
        if target is not self.mtp.base:
            raise UnsupportedError(
                "MTPDrafter drafts with the model its adapter was loaded onto (the target verifies its own mask-token "
                "predictions): call generate() on that model, e.g. drafter = MTPDrafter.from_pretrained(path, "
                "target=model); model.generate(**inputs, assistant_model=drafter).")
        weight = target.get_input_embeddings().weight
        if self.mtp.mask_embeddings.device != weight.device:
            raise UnsupportedError(f"The MTP adapter is on {self.mtp.mask_embeddings.device} but the model on "
                                   f"{weight.device}: move the model after loading the adapter (model.to(...)).")
        self._latents, self._blocks = None, {}

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> DraftTree:
        device = request.input_ids.device
        ceiling = self.mtp.config.num_mask_tokens if request.engine_sets_length else self.num_tokens
        length = min(ceiling, request.max_tokens)
        if self._latents is None or length == 0:
            return DraftTree.empty(device)
        sequence = request.input_ids
        previous = sequence[0, -1:]
        tokens, probs = [], []
        for slot in range(length):
            logits = self.mtp.sampler_logits(previous, self._latents[slot : slot + 1])
            scores = self.logits_processor(sequence, logits.float())[0]
            if self.do_sample:
                distribution = torch.softmax(scores, dim=-1)
                previous = torch.multinomial(distribution, 1)
                probs.append(distribution)
            else:
                previous = scores.argmax().view(1)
            tokens.append(previous)
            sequence = torch.cat([sequence, previous.view(1, 1)], dim=1)
        return DraftTree.chain(torch.cat(tokens), torch.stack(probs) if probs else None)

    def appended_rows(self, tree: DraftTree, next_step_drafts: bool = True) -> AppendedRows | None:
        if not next_step_drafts:  # a plain step: no blocks, so the next step drafts nothing
            self._blocks = {}
            return None
        rows = tree.num_nodes + 1
        anchors = list(range(rows)) if self.decoding == "quadratic" else [rows - 1]
        slots = self.mtp.config.num_mask_tokens
        device = tree.tokens.device
        one_block = torch.tril(torch.ones(slots, slots, dtype=torch.bool, device=device))
        gate = torch.cat([torch.zeros(rows, dtype=torch.bool, device=device),
                          torch.ones(len(anchors) * slots, dtype=torch.bool, device=device)])
        return AppendedRows(
            embeddings=self.mtp.mask_embeddings.repeat(len(anchors), 1),
            after_row=torch.tensor(anchors, device=device).repeat_interleave(slots),
            offsets=(1 + torch.arange(slots, device=device)).repeat(len(anchors)),
            sees=torch.block_diag(*[one_block] * len(anchors)),
            context=self._mask_forward(gate.unsqueeze(0), anchors),
        )

    @contextmanager
    def _mask_forward(self, gate: torch.Tensor, anchors: list[int]):
        """The LoRA gate open on the mask rows for one forward, their last hidden states kept per block."""
        with self.mtp.gate.open(gate), capture_final_hidden(self.mtp.base) as hidden:
            yield
        masks = hidden[0][0, gate.shape[1] - len(anchors) * self.mtp.config.num_mask_tokens :]
        self._blocks = dict(zip(anchors, masks.view(len(anchors), self.mtp.config.num_mask_tokens, -1)))

    def observe(self, outcome: StepOutcome) -> None:
        # The block after the last accepted row saw exactly the committed sequence but its last token.
        self._latents = None if outcome.next_token is None else self._blocks.get(outcome.num_accepted)
        self._blocks = {}

    def __repr__(self) -> str:
        return (f"MTPDrafter(k={self.mtp.config.num_mask_tokens}, num_tokens={self.num_tokens}, "
                f"decoding={self.decoding!r})")
