"""Conversations -> token ids with the target's chat template, and which tokens are the assistant's.

Draft heads learn to predict the target's replies, so only tokens inside assistant turns carry a
loss. The assistant spans are found by rendering the conversation prefix by prefix: the text
between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])`` is
assistant turn ``i`` (its content and end-of-turn marker). Token offsets of the full rendering then
tell which tokens fall inside those spans, which is exact even where BPE merges across boundaries.
"""

from __future__ import annotations


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used to locate assistant turns."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{type(tokenizer).__name__} has no chat template; draft heads are trained on chat "
                                "data rendered with the target's own template (set tokenizer.chat_template).")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:index], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: index + 1]))
        prefix = render(tokenizer, messages[: index + 1])
        if not full.startswith(prefix) or start > end:
            raise ChatTemplateError(
                "The chat template does not render conversations prefix by prefix (an earlier turn changes when "
                "later turns are added, e.g. reasoning stripped from past turns), so assistant tokens cannot be "
                "located; train on single-turn conversations (data.max_turns: 1) or use another template."
            )
        spans.append((start, end))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """``input_ids`` and ``loss_mask`` (1 on assistant tokens), truncated to ``max_length``; ``None`` if no
    assistant token survives truncation."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                        max_length=max_length)
    loss_mask = []
    span_index = 0
    for start, _ in encoded["offset_mapping"]:
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
        loss_mask.append(int(inside))
    if sum(loss_mask[1:]) == 0:
        return None
    return {"input_ids": list(encoded["input_ids"]), "loss_mask": loss_mask}
