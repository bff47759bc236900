"""The masked-input training layout of Samragh et al. 2025 ("Your LLM Knows the Future: Uncovering Its Multi-Token
Prediction Potential"), as pure functions.

A sequence ``x_0 .. x_{n-1}`` is extended by inserting, after each chosen *anchor* position ``p``, a block of ``k``
mask tokens ``m_0 .. m_{k-1}``, so that one forward trains next-token prediction on the ordinary rows and
multi-token prediction from many prefixes at once. Rows of the extended sequence:

- ordinary row ``i``: token ``x_i``, position id ``i``; it attends to ordinary rows ``0 .. i`` only (never to a mask
  row, so its outputs are those of the plain sequence); label ``x_{i+1}`` (the next token);
- mask slot ``j`` of the block after ``p``: position id ``p + 1 + j`` (the block stands where ``x_{p+1} ..
  x_{p+k}`` would be); it attends to ordinary rows ``0 .. p`` (its prefix) and to slots ``0 .. j`` of its own
  block, never to another block; label ``x_{p+2+j}``.

Label convention: ordinary row ``p`` already predicts ``x_{p+1}`` (the base model's next token), so mask slot ``j``
after ``p`` predicts the token ``j + 1`` steps beyond that one, ``x_{p+2+j}`` (slot 0: ``x_{p+2}``; slot ``k-1``:
``x_{p+k+1}``). A label beyond the sequence is ``IGNORE_INDEX``. The sampler head of slot ``j`` is fed the token
sampled just before it, ``x_{p+1+j}`` during training (teacher forcing: ``sampler_inputs``).

Rows are ordered: ordinary row ``p``, then its block (if ``p`` is an anchor), then ordinary row ``p + 1``, and so on;
every row's allowed keys are then its own logical sequence in order, which is what a sliding-window mask needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class MTPLayout:
    """One extended sequence (shared by every row of a batch). All tensors are 1-D over the ``N = n + k * len(anchors)``
    rows unless stated.

    Attributes:
        length, num_masks: ``n`` and ``k``.
        anchors: ``(A,)`` the positions after which a block is inserted, increasing.
        source: the original index of an ordinary row; the anchor ``p`` of a mask row.
        slot: ``-1`` on ordinary rows, ``j`` on mask slot ``j``.
        position_ids: ``i`` on ordinary row ``i``, ``p + 1 + j`` on slot ``j`` after ``p``.
        allowed: ``(N, N)`` bool, ``allowed[query, key]`` True where the query row may attend to the key row.
        ordinary_rows: ``(n,)`` the row of each original position.
        mask_rows: ``(A, k)`` the row of slot ``j`` of the block after ``anchors[a]``.
    """

    length: int
    num_masks: int
    anchors: torch.Tensor
    source: torch.Tensor
    slot: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    ordinary_rows: torch.Tensor
    mask_rows: torch.Tensor

    @property
    def is_mask(self) -> torch.Tensor:
        return self.slot >= 0

    @property
    def num_rows(self) -> int:
        return int(self.slot.numel())

    def token_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(..., N)``: the tokens of ``input_ids`` ``(..., n)`` in their rows, ``-1 - j`` on mask slot ``j``."""
        tokens = input_ids[..., self.source.to(input_ids.device)]
        return torch.where(self.is_mask.to(input_ids.device), -1 - self.slot.to(input_ids.device), tokens)

    def labels(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., N)`` targets: ``x_{i+1}`` on ordinary row ``i``, ``x_{p+2+j}`` on slot ``j`` after ``p``,
        ``IGNORE_INDEX`` past the end or where ``valid`` ``(..., n)`` (a padding mask, 1 = real token) is 0."""
        return _gather_ahead(input_ids, self.source + 1 + torch.where(self.is_mask, self.slot + 1, 0), valid)

    def sampler_inputs(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., N)``: on mask slot ``j`` after ``p`` the token the sampler conditions on, ``x_{p+1+j}`` (teacher
        forcing); on ordinary rows ``x_{i+1}`` (unused). ``IGNORE_INDEX`` where it does not exist."""
        return _gather_ahead(input_ids, self.source + 1 + torch.where(self.is_mask, self.slot, 0), valid)


def _gather_ahead(input_ids: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    length = input_ids.shape[-1]
    index = index.to(input_ids.device)
    inside = index < length
    values = input_ids[..., index.clamp(max=length - 1)]
    if valid is not None:
        inside = inside & valid.to(input_ids.device).bool()[..., index.clamp(max=length - 1)]
    return torch.where(inside, values, torch.full_like(values, IGNORE_INDEX))


def check_anchors(length: int, num_masks: int, anchors) -> list[int]:
    """The anchors as a sorted list; ``ValueError`` unless they are distinct positions in ``[0, length)``."""
    if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"The number of mask tokens must be a positive integer, got {num_masks!r}.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"The sequence length must be a positive integer, got {length!r}.")
    values = [int(p) for p in (anchors.tolist() if isinstance(anchors, torch.Tensor) else anchors)]
    if len(set(values)) != len(values) or any(not 0 <= p < length for p in values):
        raise ValueError(f"Mask blocks go after distinct positions in [0, {length}), got {values}.")
    return sorted(values)


def every_anchor(length: int) -> list[int]:
    """Every position whose first mask slot has a label (``p + 2 < length``): a block after each of them."""
    return list(range(max(length - 2, 0)))


def build_layout(length: int, num_masks: int, anchors, device=None) -> MTPLayout:
    """The extended sequence for a length-``length`` sequence with ``num_masks`` masks after each of ``anchors``."""
    anchors = check_anchors(length, num_masks, anchors)
    is_anchor = torch.zeros(length, dtype=torch.bool)
    is_anchor[anchors] = True
    rows_per_position = 1 + num_masks * is_anchor.long()  # ordinary row + its block
    first_row = torch.cumsum(rows_per_position, 0) - rows_per_position
    ordinary_rows = first_row
    anchor_tensor = torch.tensor(anchors, dtype=torch.long)
    mask_rows = first_row[anchor_tensor].unsqueeze(1) + 1 + torch.arange(num_masks)
    total = length + num_masks * len(anchors)
    source = torch.empty(total, dtype=torch.long)
    slot = torch.full((total,), -1, dtype=torch.long)
    source[ordinary_rows] = torch.arange(length)
    source[mask_rows] = anchor_tensor.unsqueeze(1).expand(-1, num_masks)
    slot[mask_rows] = torch.arange(num_masks).expand(len(anchors), -1)
    position_ids = torch.where(slot >= 0, source + 1 + slot, source)
    layout = MTPLayout(length=length, num_masks=num_masks, anchors=anchor_tensor, source=source, slot=slot,
                       position_ids=position_ids, allowed=attention_pattern(source, slot), ordinary_rows=ordinary_rows,
                       mask_rows=mask_rows.reshape(len(anchors), num_masks))
    return layout if device is None else move_layout(layout, device)


def attention_pattern(source: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` bool: a query sees the ordinary rows up to its anchor (``source``), and a mask query also the slots
    up to its own of its own block."""
    query_source, key_source = source.unsqueeze(1), source.unsqueeze(0)
    query_slot, key_slot = slot.unsqueeze(1), slot.unsqueeze(0)
    ordinary_key = (key_slot < 0) & (key_source <= query_source)
    same_block = (query_slot >= 0) & (key_slot >= 0) & (key_source == query_source) & (key_slot <= query_slot)
    return ordinary_key | same_block


def move_layout(layout: MTPLayout, device) -> MTPLayout:
    values = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
              for name, value in vars(layout).items()}
    return MTPLayout(**values)
