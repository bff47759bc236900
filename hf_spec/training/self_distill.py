"""Self-distillation data: the target regenerates the assistant turns of the training conversations, in batches.

Medusa-2 (Cai et al. 2024, "self-distillation"), EAGLE (Li et al. 2024) and FR-Spec / VocabTrim train on the
target's own replies when the original SFT data is unavailable or does not match the target: the heads then
learn the distribution they will be verified against.

How it is done here:

- **Batched.** Every round regenerates the next assistant turn of all conversations still going, with one
  ``generate()`` call per batch of prompts of similar length (left padding and an attention mask; one
  temperature per batch, greedy is temperature 0), on a static KV cache.
- **Token ids, not text.** A conversation is kept as the exact ids the target saw and produced: the rendered
  prompt, the generated reply ids (up to and including the end-of-turn token the target stopped on), then the
  template's text between that token and the next generation prompt. Nothing is decoded and re-tokenized, so
  the stored sequence is exactly what the target conditioned on.
- **Length cap.** A turn whose room under ``max_length`` is below ``min_new_tokens``, or whose prompt is longer
  than ``max_prompt_tokens``, is not generated. A reply that hits its cap without an end-of-turn token is
  dropped (the conversation ends before it), masked (kept as context with no loss; the conversation ends
  after it) or kept (with its loss; the conversation ends after it). Keeping is exact for draft training:
  every token of a cut reply is still a draw from the target given its prefix, and nothing follows it, so
  the next-token conditionals the heads learn are unbiased; dropping cut replies instead biases the data
  towards short replies, and on SmolLM2 and ShareGPT it threw away most of the generated tokens (86 of 245
  replies cut at 384 tokens, 35 loops: 34% of the generated tokens kept).
- **Degenerate loops.** Small targets decoding greedily often fall into a loop (the same few tokens
  repeated until the cap: 3 of 7 greedy SmolLM2-135M replies to ShareGPT prompts in one sample). A row
  whose last ``loop_window`` tokens hold fewer than ``loop_min_distinct`` distinct tokens stops there and
  is handled like a reply cut by the cap (dropped under ``keep``: its repeated tail would teach the heads
  a loop), so a batch no longer runs to the cap for a loop.
- **Plain distribution.** Replies are drawn from the target at the given temperature, with no top-k / top-p /
  repetition penalty (the model's own generation-config defaults for those are overridden), so the data
  follows the target's distribution at that temperature.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .chat_tokens import ChatTemplateError, render

_SENTINEL = "\u2063hf-spec-reply\u2063"


@dataclass
class DistillSettings:
    """How replies are regenerated (see the module docstring)."""

    max_length: int = 512
    max_new_tokens: int = 256
    temperatures: tuple[float, ...] = (0.0,)
    batch_size: int = 16
    min_new_tokens: int = 16
    max_prompt_tokens: int | None = None
    cut_replies: str = "drop"
    seed: int = 0
    loop_window: int = 64  # 0: no loop detection
    loop_min_distinct: int = 16

    @classmethod
    def from_data_section(cls, config) -> "DistillSettings":
        from .data_config import as_data_section

        config = as_data_section(config)
        return cls(max_length=config.max_length, max_new_tokens=config.self_distillation_max_new_tokens,
                   temperatures=tuple(config.reply_temperatures()), batch_size=config.self_distillation_batch_size,
                   min_new_tokens=config.self_distillation_min_new_tokens,
                   max_prompt_tokens=config.self_distillation_max_prompt_tokens,
                   cut_replies=config.self_distillation_cut_replies, seed=config.seed,
                   loop_window=config.self_distillation_loop_window,
                   loop_min_distinct=config.self_distillation_loop_min_distinct)


@dataclass
class DistillStats:
    replies: int = 0  # replies kept with a loss
    cut_replies: int = 0  # replies that hit the length cap or looped (dropped, masked or kept)
    looping_replies: int = 0  # of which stopped as degenerate loops
    generated_tokens: int = 0  # every reply token the target produced, cut replies included
    assistant_tokens: int = 0  # reply tokens kept with a loss
    padded_steps: int = 0  # batch rows x decoding steps actually computed (useful + wasted on finished rows)
    generate_calls: int = 0
    seconds: float = 0.0


@dataclass
class _Conversation:
    id: str
    messages: list[dict]
    temperature: float
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    last_reply_end: int = -1  # index in ``messages`` of the last regenerated assistant turn
    stop_text: str = ""  # the end-of-turn token the last reply stopped on, as text
    replies: int = 0
    finished: bool = False


def temperature_for(conversation_id: str, temperatures: tuple[float, ...] | list[float], seed: int) -> float:
    """The reply temperature of a conversation: fixed by a hash of its id, so independent of order and chunking."""
    digest = hashlib.sha256(f"temperature:{seed}:{conversation_id}".encode()).digest()
    return float(temperatures[int.from_bytes(digest[:8], "big") % len(temperatures)])


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a reply: the model's generation-config EOS ids and the tokenizer's EOS."""
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    found = sorted({int(token) for token in ids if token is not None})
    if not found:
        raise ValueError("The target has no end-of-sequence token (generation_config.eos_token_id and "
                         "tokenizer.eos_token_id are unset); self-distilled replies could never end.")
    return found


def _assistant_indices(messages: list[dict]) -> list[int]:
    return [index for index, message in enumerate(messages) if message["role"] == "assistant"]


def _first_prompt(tokenizer, conversation: _Conversation, turn: int) -> list[int]:
    text = render(tokenizer, conversation.messages[:turn], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bridge_ids(tokenizer, conversation: _Conversation, turn: int) -> list[int] | None:
    """Ids of the template text between the last reply's end-of-turn token and the generation prompt of
    assistant turn ``turn``; ``None`` when the template does not end a reply with that token."""
    previous = conversation.last_reply_end
    history = conversation.messages[:previous]
    placeholder = {"role": "assistant", "content": _SENTINEL}
    text = render(tokenizer, history + [placeholder] + conversation.messages[previous + 1: turn],
                  add_generation_prompt=True)
    start = text.find(_SENTINEL)
    if start < 0 or text[:start] != render(tokenizer, history, add_generation_prompt=True):
        raise ChatTemplateError(
            "The chat template does not render conversations prefix by prefix (an earlier turn changes when later "
            "turns are added), so multi-turn replies cannot be regenerated as token ids; use data.max_turns: 1."
        )
    after = text[start + len(_SENTINEL):]
    if not conversation.stop_text or not after.startswith(conversation.stop_text):
        return None
    return tokenizer(after[len(conversation.stop_text):], add_special_tokens=False)["input_ids"]


def _next_prompt(tokenizer, conversation: _Conversation, settings: DistillSettings) -> tuple[int, list[int]] | None:
    """``(assistant turn index, prompt ids)`` of the conversation's next reply, or ``None`` if it is over."""
    turns = [index for index in _assistant_indices(conversation.messages) if index > conversation.last_reply_end]
    if conversation.finished or not turns:
        return None
    turn = turns[0]
    if conversation.last_reply_end < 0:
        prompt = _first_prompt(tokenizer, conversation, turn)
    else:
        bridge = _bridge_ids(tokenizer, conversation, turn)
        if bridge is None:
            return None
        prompt = conversation.input_ids + bridge
    if settings.max_length - len(prompt) < settings.min_new_tokens:
        return None
    if settings.max_prompt_tokens is not None and len(prompt) > settings.max_prompt_tokens:
        return None
    return turn, prompt


def _generation_config(settings: DistillSettings, temperature: float, max_new_tokens: int, stop_ids: list[int],
                       pad_id: int):
    from transformers import GenerationConfig

    # Explicit neutral values: generate() fills unset ones from the model's own generation config.
    options = dict(repetition_penalty=1.0, no_repeat_ngram_size=0)
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0)
    else:
        options.update(do_sample=False)
    # A static cache: a dynamic one concatenates every layer's keys and values on each step, which at batch 64
    # and a few hundred tokens of context made decoding 3.8x slower on a 2-core CPU (13.7 vs 51.8 tokens/s).
    # No automatic torch.compile of the static-cache forward (transformers does it on CUDA): every batch has its
    # own prompt width, so it would recompile for each one.
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                            cache_implementation="static", disable_compile=True, **options)


class LoopStop:
    """A ``generate()`` stopping criterion: a row is done once its last ``window`` generated tokens hold fewer
    than ``min_distinct`` distinct tokens (a degenerate loop). Remembers, per row, how many tokens it had
    generated when it was stopped this way (rows that had already ended on a stop token are ignored)."""

    def __init__(self, prompt_width: int, window: int, min_distinct: int, stop_ids: list[int]):
        self.prompt_width = prompt_width
        self.window = window
        self.min_distinct = min_distinct
        self.stop_ids = torch.tensor(stop_ids)
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width:]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.window <= 0 or generated.shape[1] < self.window:
            return done
        tail = generated[:, -self.window:].sort(dim=1).values
        distinct = (tail[:, 1:] != tail[:, :-1]).sum(dim=1) + 1
        ended = torch.isin(generated, self.stop_ids.to(generated.device)).any(dim=1)
        looping = (distinct < self.min_distinct) & ~ended
        for row in looping.nonzero().flatten().tolist():
            self.stopped_at.setdefault(row, generated.shape[1])
        return looping


@torch.no_grad()
def generate_replies(model, prompts: list[list[int]], budgets: list[int], temperature: float, stop_ids: list[int],
                     pad_id: int, settings: DistillSettings) -> tuple[list[list[int]], list[str], int]:
    """One left-padded batched ``generate()``: each row's reply ids (through its stop token) and how it ended
    (``"stop"``, ``"cut"`` by its budget, or ``"loop"``); plus the rows x steps computed."""
    from transformers import StoppingCriteriaList

    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    config = _generation_config(settings, temperature, max(budgets), stop_ids, pad_id)
    loops = LoopStop(width, settings.loop_window, settings.loop_min_distinct, stop_ids)
    output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                            generation_config=config, stopping_criteria=StoppingCriteriaList([loops]))
    generated = output[:, width:].cpu()
    stops = torch.isin(generated, torch.tensor(stop_ids))
    replies, endings = [], []
    for row, budget in enumerate(budgets):
        stopped = loops.stopped_at.get(row)
        looped = stopped is not None and stopped <= budget
        limit = stopped if looped else budget
        hits = stops[row, :limit].nonzero()
        if hits.numel():
            replies.append(generated[row, : int(hits[0]) + 1].tolist())
            endings.append("stop")
        else:
            replies.append(generated[row, :limit].tolist())
            endings.append("loop" if looped else "cut")
    return replies, endings, generated.shape[0] * generated.shape[1]


def _record_reply(tokenizer, conversation: _Conversation, turn: int, prompt: list[int], reply: list[int],
                  ending: str, settings: DistillSettings, stats: DistillStats) -> None:
    stats.generated_tokens += len(reply)
    was_cut = ending != "stop"
    if was_cut:
        stats.cut_replies += 1
        stats.looping_replies += ending == "loop"
        conversation.finished = True
        if settings.cut_replies == "drop" or (settings.cut_replies == "keep" and ending == "loop"):
            return
    with_loss = not was_cut or settings.cut_replies == "keep"
    conversation.loss_mask = conversation.loss_mask + [0] * (len(prompt) - len(conversation.input_ids))
    conversation.loss_mask += [int(with_loss)] * len(reply)
    conversation.input_ids = prompt + reply
    conversation.last_reply_end = turn
    if with_loss:
        conversation.replies += 1
        stats.replies += 1
        stats.assistant_tokens += len(reply)
        conversation.stop_text = tokenizer.decode(reply[-1:], skip_special_tokens=False)


def _batches(pending: list[tuple[_Conversation, int, list[int]]], batch_size: int):
    """Group by temperature and batch prompts of similar length together."""
    ordered = sorted(pending, key=lambda item: (item[0].temperature, len(item[2])))
    batch: list = []
    for item in ordered:
        if batch and (len(batch) == batch_size or batch[0][0].temperature != item[0].temperature):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def distill_conversations(model, tokenizer, conversations: list[tuple[str, list[dict]]], settings: DistillSettings,
                          seed_offset: int = 0, on_tokens: Callable[[int], None] | None = None
                          ) -> tuple[list[dict], DistillStats]:
    """Regenerate every assistant turn of ``conversations`` with ``model``, in batches.

    Returns examples ``{"id", "input_ids", "loss_mask", "temperature"}`` (conversations left with no kept
    reply are dropped) and counts. ``seed_offset`` makes the sampling seed of each batch depend on which chunk
    of a larger run this is; ``on_tokens(n)`` is called with the reply tokens of each batch (progress bars).
    """
    import time

    if settings.cut_replies not in ("drop", "mask", "keep"):
        raise ValueError(f"cut_replies must be 'drop', 'mask' or 'keep', got {settings.cut_replies!r}.")
    model.eval()
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    states = [_Conversation(cid, messages, temperature_for(cid, settings.temperatures, settings.seed))
              for cid, messages in conversations]
    stats = DistillStats()
    started = time.perf_counter()
    for round_index in range(max((len(_assistant_indices(m)) for _, m in conversations), default=0)):
        pending = []
        for state in states:
            step = _next_prompt(tokenizer, state, settings)
            if step is None:
                state.finished = True
            else:
                pending.append((state, *step))
        for batch_index, batch in enumerate(_batches(pending, settings.batch_size)):
            torch.manual_seed(settings.seed * 1_000_003 + seed_offset * 10_007 + round_index * 101 + batch_index)
            prompts = [prompt for _, _, prompt in batch]
            budgets = [min(settings.max_new_tokens, settings.max_length - len(prompt)) for prompt in prompts]
            replies, endings, computed = generate_replies(model, prompts, budgets, batch[0][0].temperature, stop_ids,
                                                          pad_id, settings)
            stats.generate_calls += 1
            stats.padded_steps += computed
            for (state, turn, prompt), reply, ending in zip(batch, replies, endings):
                _record_reply(tokenizer, state, turn, prompt, reply, ending, settings, stats)
            if on_tokens is not None:
                on_tokens(sum(len(reply) for reply in replies))
    stats.seconds = time.perf_counter() - started
    examples = [{"id": state.id, "input_ids": state.input_ids, "loss_mask": state.loss_mask,
                 "temperature": state.temperature} for state in states if state.replies > 0]
    return examples, stats
