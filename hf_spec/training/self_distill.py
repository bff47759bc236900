"""Self-distillation data: the target regenerates the assistant turns of the training conversations.

Medusa-2 (Cai et al. 2024, "self-distillation") and EAGLE train on the target's own replies when the original
SFT data is unavailable or does not match the target: heads then learn the distribution they will
actually be verified against. Each assistant turn is regenerated given the conversation so far (with
the earlier turns already regenerated), turn by turn.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def regenerate_conversation(model, tokenizer, messages: list[dict], *, max_new_tokens: int, max_length: int,
                            do_sample: bool = False, temperature: float = 0.7, seed: int = 0) -> list[dict]:
    """``messages`` with every assistant turn replaced by the target's reply; stops at ``max_length`` tokens."""
    regenerated: list[dict] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            regenerated.append(message)
            continue
        prompt = tokenizer.apply_chat_template(regenerated, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"].to(model.device)
        if prompt.shape[1] >= max_length:
            break
        torch.manual_seed(seed * 1_000_003 + index)
        options = dict(do_sample=True, temperature=temperature) if do_sample else dict(do_sample=False)
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **options)
        reply = tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)
        if not reply:
            break
        regenerated.append({"role": "assistant", "content": reply})
    while regenerated and regenerated[-1]["role"] != "assistant":
        regenerated.pop()
    return regenerated


def regenerate_all(model, tokenizer, conversations: list[tuple[str, list[dict]]], *, max_new_tokens: int,
                   max_length: int, do_sample: bool, temperature: float, seed: int,
                   disable_progress: bool = False) -> list[tuple[str, list[dict]]]:
    """Regenerate every conversation (a progress bar; conversations left with no reply are dropped)."""
    model.eval()
    results = []
    for number, (conversation_id, messages) in enumerate(tqdm(conversations, desc="self-distillation",
                                                               disable=disable_progress)):
        regenerated = regenerate_conversation(model, tokenizer, messages, max_new_tokens=max_new_tokens,
                                              max_length=max_length, do_sample=do_sample, temperature=temperature,
                                              seed=seed + number)
        if any(message["role"] == "assistant" for message in regenerated):
            results.append((conversation_id, regenerated))
    return results
