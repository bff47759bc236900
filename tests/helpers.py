"""Helpers shared by the tests (fixtures stay in conftest.py): perturbed drafts, tiny ShareGPT data and a
target that stops, Medusa heads fitted to a prompt."""

from __future__ import annotations

import copy
import json

import torch

from hf_spec.drafters.medusa import MedusaHeads
from hf_spec.training.medusa_objective import MedusaObjective
from hf_spec.training.models import load_target

MEDUSA_MAX_NEW = 32


def perturbed_copy(model, scale: float, seed: int = 1):
    """``model`` with gaussian noise of ``scale`` times each weight tensor's standard deviation added.

    A draft that agrees with the target often but not always: partial acceptance in the middle of
    trees, corrections and bonus tokens all happen within a few steps.
    """
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(noise * scale * parameter.std().clamp_min(1e-3))
    return noisy


# ---------------------------------------------------------------- data (prepare-data, self-distillation)
def stopping_target(bias: float = 4.0):
    """The tiny random target with a fixed bonus on its end-of-turn logit: sampled replies end after ~6
    tokens on average (a random tiny model would otherwise almost never stop)."""
    model, tokenizer = load_target("hf_spec:tiny-random-llama")
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = old.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = bias
    model.lm_head = head
    return model, tokenizer


def conversations(count: int, turns: int = 2) -> list[tuple[str, list[dict]]]:
    result = []
    for index in range(count):
        messages = [{"role": "user", "content": f"Question number {index}?"}, {"role": "assistant", "content": "A."}]
        if turns == 2:
            messages += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "B."}]
        result.append((f"c{index}", messages))
    return result


def sharegpt_file(tmp_path, count: int) -> str:
    entries = [{"id": cid, "conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                             for m in messages]} for cid, messages in conversations(count)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    return str(path)


def reply_spans(loss_mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for index, flag in enumerate(loss_mask + [0]):
        if flag and start is None:
            start = index
        if not flag and start is not None:
            spans.append((start, index))
            start = None
    return spans


# ---------------------------------------------------------------- Medusa
def plain(model, prompt, max_new_tokens=MEDUSA_MAX_NEW):
    return model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)


def fitted_heads(target, prompt, num_heads=3, steps=60, draft_vocab=None):
    """Heads that memorised the target's own greedy continuation of ``prompt`` (so drafts get accepted); with
    ``draft_vocab``, heads scoring only that draft vocabulary (labels outside it are left out of the loss)."""
    sequence = plain(target, prompt, max_new_tokens=60)
    heads = MedusaHeads.for_target(target, num_heads=num_heads, draft_vocab=draft_vocab)
    objective = MedusaObjective(target, heads, labels="hard")
    mask = torch.ones_like(sequence)
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.03)
    target.requires_grad_(False)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(sequence, mask, mask.bool())["loss"].backward()
        optimizer.step()
    return heads.eval()
