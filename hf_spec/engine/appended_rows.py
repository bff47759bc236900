"""Rows a drafter appends to the verification forward, for drafters that draft *inside* the target's forward.

Gated-LoRA multi-token prediction (Samragh et al. 2025, "Your LLM Knows the Future: Uncovering Its Multi-Token
Prediction Potential") appends blocks of mask tokens after the root and after each draft token: the one forward
that verifies this step's draft also computes the next step's. The engine runs such rows after the block rows, in
the same forward:

- they are given as input embeddings (a mask token has no token id);
- appended row ``r`` continues block row ``after_row[r]``: it sees the cached context and that row's path (the row
  itself included), plus the appended rows ``sees[r]`` names (its own block up to itself); its position id is that
  row's plus ``offsets[r]``;
- no block row ever sees an appended row, so the block rows' logits are exactly what they would be without them;
- only the block rows' logits are computed, and the appended rows never enter the committed KV cache (they are the
  last rows of the block, and the engine keeps only accepted block rows);
- ``context`` is entered around the forward (gated-LoRA MTP opens its LoRA gate on the appended rows there and
  records their hidden states).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch


@dataclass
class AppendedRows:
    """Extra rows of one verification forward (``m`` rows; see the module docstring).

    Attributes:
        embeddings: ``(m, hidden)`` input embeddings, in the units the decoder layers take (after any embedding scale).
        after_row: ``(m,)`` the block row (0 = root, ``i + 1`` = node ``i``) each row continues.
        offsets: ``(m,)`` position of each row minus the position of its ``after_row``, at least 1.
        sees: ``(m, m)`` bool, ``sees[r, s]``: row ``r`` attends to appended row ``s`` (``s`` listed before ``r`` in
            its own logical sequence, e.g. earlier slots of its block, and ``sees[r, r]`` True).
        context: entered around the forward.
    """

    embeddings: torch.Tensor
    after_row: torch.Tensor
    offsets: torch.Tensor
    sees: torch.Tensor
    context: AbstractContextManager = field(default_factory=nullcontext)

    def __post_init__(self):
        count = self.embeddings.shape[0]
        if self.embeddings.dim() != 2 or self.after_row.shape != (count,) or self.offsets.shape != (count,):
            raise ValueError(f"AppendedRows needs (m, hidden) embeddings and (m,) after_row and offsets, got "
                             f"{tuple(self.embeddings.shape)}, {tuple(self.after_row.shape)}, "
                             f"{tuple(self.offsets.shape)}.")
        if self.sees.shape != (count, count) or self.sees.dtype != torch.bool:
            raise ValueError(f"AppendedRows.sees must be an ({count}, {count}) bool tensor, got "
                             f"{tuple(self.sees.shape)} {self.sees.dtype}.")
        if count and int(self.offsets.min()) < 1:
            raise ValueError("AppendedRows.offsets must be at least 1 (an appended row stands after its block row).")

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    def attention(self, block_ancestry: torch.Tensor, past_length: int) -> torch.Tensor:
        """``(m, past_length + block + m)`` bool: the context, the path of each row's block row, its own rows."""
        context = torch.ones(self.count, past_length, dtype=torch.bool, device=block_ancestry.device)
        path = block_ancestry[self.after_row.to(block_ancestry.device)]
        return torch.cat([context, path, self.sees.to(block_ancestry.device)], dim=1)

    def positions(self, block_positions: torch.Tensor) -> torch.Tensor:
        """``(m,)`` position ids, from the block rows' ``(block,)`` position ids."""
        return block_positions[self.after_row.to(block_positions.device)] + self.offsets.to(block_positions.device)
