"""Pieces of the training data that every stage shares: which conversations are read, the held-out split,
and the batch collator. ``prepare_data.py`` builds the data itself (tokenized or self-distilled, plus the
feature cache) once, on disk; training processes read it back.

- ``read_conversations``: the first ``num_conversations`` usable ShareGPT conversations (``sharegpt.py``),
  each cut to ``max_turns`` exchanges.
- ``is_heldout``: a conversation's split, by a hash of its id and the seed: deterministic, independent of
  order and of how many conversations are read (a larger run's held-out set contains a smaller run's).
- ``PaddingCollator``: right-padded batches with the cached features a method reads.

The teacher-forced soft labels (the target's own next-token distributions) are computed during training
from the hidden states through the frozen ``lm_head``: storing ``V``-wide distributions per token would
cost far more disk than the hidden states they come from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .data_config import DataSection
from .sharegpt import iter_sharegpt

SPLITS = ("train", "heldout")


def is_heldout(conversation_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def limit_turns(messages: list[dict], max_turns: int | None) -> list[dict]:
    """Keep an optional system message and the first ``max_turns`` user/assistant exchanges."""
    if max_turns is None:
        return messages
    system = messages[:1] if messages[0]["role"] == "system" else []
    return system + messages[len(system): len(system) + 2 * max_turns]


def read_conversations(config: DataSection) -> list[tuple[str, list[dict]]]:
    path = None if config.source == "sharegpt" else config.source
    return [(cid, limit_turns(messages, config.max_turns))
            for cid, messages in iter_sharegpt(path, config.num_conversations)]


@dataclass
class PaddingCollator:
    """Right-pads ``input_ids`` / ``loss_mask`` into a batch with an ``attention_mask``; every other per-token
    field (cached features such as ``hidden`` or ``hidden_15``: ``(length, hidden)``) is padded with zeros
    into a float32 ``(batch, length, hidden)`` tensor."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        loss_mask = torch.zeros(batch, length, dtype=torch.bool)
        features: dict[str, torch.Tensor] = {}
        for index, row in enumerate(rows):
            size = len(row["input_ids"])
            input_ids[index, :size] = torch.as_tensor(row["input_ids"])
            attention_mask[index, :size] = 1
            loss_mask[index, :size] = torch.as_tensor(row["loss_mask"]).bool()
            for name in row.keys() - {"input_ids", "loss_mask", "id"}:
                states = torch.as_tensor(row[name])
                if name not in features:
                    features[name] = torch.zeros(batch, length, *states.shape[1:], dtype=torch.float32)
                features[name][index, :size] = states.float()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, **features}
