"""Turn prompts into token ids with the target's chat template; condition later turns on earlier answers.

As in Spec-Bench (Xia et al. 2024) for MT-Bench, the second turn of a conversation is asked after the
model's own first answer. Every method must see the same input, so that answer comes from the
baseline (plain ``generate()`` of the target with the run's decoding settings), produced once before
measuring; each turn then becomes one benchmark item, ``<prompt id>/turn<k>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .tasks import Prompt


@dataclass
class BenchItem:
    """One measured generation input: a prompt's turn rendered with the chat template."""

    id: str
    group: str
    input_ids: torch.Tensor  # (1, length)
    messages: list[dict]


def render_items(prompts: list[Prompt], tokenizer, answer: Callable[[torch.Tensor], torch.Tensor],
                 progress: bool = True) -> list[BenchItem]:
    """One item per turn. ``answer(input_ids) -> new token ids`` answers all but the last turn of each prompt."""
    items: list[BenchItem] = []
    multi_turn = sum(len(prompt.turns) - 1 for prompt in prompts)
    with tqdm(total=multi_turn, desc="answering earlier turns", unit="turn", disable=not progress or not multi_turn) as bar:
        for prompt in prompts:
            messages: list[dict] = []
            for turn, text in enumerate(prompt.turns, start=1):
                messages = messages + [{"role": "user", "content": text}]
                ids = chat_ids(tokenizer, messages)
                suffix = f"/turn{turn}" if len(prompt.turns) > 1 else ""
                items.append(BenchItem(prompt.id + suffix, prompt.group, ids, messages))
                if turn < len(prompt.turns):
                    reply = tokenizer.decode(answer(ids), skip_special_tokens=True)
                    messages = messages + [{"role": "assistant", "content": reply}]
                    bar.update()
    return items


def chat_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """``(1, length)`` token ids of ``messages`` with the generation prompt of the chat template."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return encoded["input_ids"]
