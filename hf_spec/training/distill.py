"""Distil a draft model from its target with TRL's on-policy GKD trainer (``recipes/distill_draft.py``).

A draft model is accepted as often as its next-token choices agree with the target's, so the draft is
trained to match the target's distributions: generalized knowledge distillation (GKD; Agarwal et al. 2024,
"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"), which DistillSpec
(Zhou et al. 2024, "DistillSpec: Improving Speculative Decoding via Knowledge Distillation") applies to
draft models. The trainer is TRL's ``trl.experimental.gkd.GKDTrainer``; this module only builds its inputs
and exports its result:

- ``student_from_target``: the target's first ``n`` decoder layers as an ordinary model of the target's
  class (weights copied, not shared as in ``hf_spec.drafters.early_exit``), the usual starting point when
  the target has no smaller sibling. A separate smaller model with the same vocabulary (optionally trained
  through LoRA adapters, merged at export) is the other.
- ``prompt_dataset`` / ``prepared_dataset``: rows of token ids and a completion mask for TRL's ChatML
  collator, from plain prompts, conversations, or the data ``hf-spec prepare-data`` built (e.g. the
  target's self-distilled ShareGPT replies: off-policy batches then train on the target's own outputs).
- ``distill``: one run end to end (teacher = target). ``gkd.beta`` picks the divergence (0: forward KL,
  1: reverse KL, in between: the generalized Jensen-Shannon divergence), ``gkd.lmbda`` the fraction of
  on-policy batches (the student's own samples, scored by the teacher), ``gkd.seq_kd`` has the teacher
  sample the other batches. The student is saved atomically (config + safetensors + tokenizer + model card)
  and loads with ``AutoModelForCausalLM.from_pretrained`` for ``hf_spec.DraftModelDrafter``.
- ``acceptance_rate``: how often the draft's greedy token equals the target's along the target's own greedy
  continuation (teacher forced). Greedy speculative decoding accepts exactly these tokens: after an accepted
  prefix the draft conditions on the target's tokens, so ``tokens_per_step`` turns the same matches into the
  tokens per target forward of a chain of any length.

Recipe YAML (``configs/distill/*.yaml``; every section strict about unknown keys)::

    model:    the target (ModelSection: name_or_path, dtype, attn_implementation)
    student:  name_or_path (a smaller model) or layers (the target's first n), dtype, lora
    data:     the prepared data (DataSection, as for every hf_spec recipe), or prompts_file
    gkd:      beta, lmbda, temperature, max_new_tokens, seq_kd, max_prompt_tokens
    training: output_dir, steps, batch sizes, learning rate, ... (passed on to GKDConfig)
    eval:     heldout_prompts, max_new_tokens, draft_lengths
    hub:      push, repo_id, private, license
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UnsupportedError
from .checkpoints import gathered_state_dict
from .config import ConfigError, HubSection, ModelSection, apply_override, build_section
from .data_config import DataSection, data_section_problems
from .launch import zero_stage

logger = logging.getLogger(__name__)
CARD_TEMPLATE = "distill.md"
CARD_TAGS = ["hf_spec", "speculative-decoding", "draft-model", "distillation"]
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------- configuration
@dataclass
class StudentSection:
    """The draft being trained: ``name_or_path`` (a smaller model with the target's vocabulary) or ``layers``
    (the target's first ``layers`` decoder layers, ``student_from_target``). ``lora`` (a mapping of
    ``r``, ``alpha``, ``dropout``, ``target_modules``) trains adapters on a ``name_or_path`` student,
    merged into its weights at export."""

    name_or_path: str | None = None
    layers: int | None = None
    dtype: str = "float32"
    lora: dict | None = None


@dataclass
class GKDSection:
    """Settings of TRL's ``GKDConfig`` (Agarwal et al. 2024, Eq. 1 and Algorithm 1)."""

    beta: float = 0.0  # 0: forward KL(teacher || student); 1: reverse KL; in between: generalized JSD
    lmbda: float = 0.5  # fraction of batches replaced by the student's own samples (on-policy)
    temperature: float = 0.9  # sampling temperature of on-policy (and seq_kd) completions
    max_new_tokens: int = 128  # length of those completions
    seq_kd: bool = False  # off-policy batches: sample completions from the teacher instead of reading the data's
    max_prompt_tokens: int | None = None  # leave out longer prompts (they dominate generation cost on a CPU)


@dataclass
class DistillTrainingSection:
    output_dir: str = "outputs/distill"  # the exported student (a model folder)
    trainer_dir: str | None = None  # TRL's working folder (checkpoints, logs); default: <output_dir>.trainer
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    epochs: int = 1
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA that supports it, else no), "no", "bf16", "fp16"
    gradient_checkpointing: bool = False
    log_every_steps: int = 10
    save_every_steps: int | None = None  # trainer checkpoints in trainer_dir (resume: training.resume: true)
    resume: bool = False
    report_to: list[str] = field(default_factory=list)
    seed: int = 0
    num_threads: int | None = None  # torch CPU threads per process


@dataclass
class DistillEvalSection:
    heldout_prompts: int = 16  # held-out prompts whose greedy continuation measures acceptance (0: none)
    max_new_tokens: int = 64  # length of those continuations
    draft_lengths: list[int] = field(default_factory=lambda: [1, 3, 5])  # tokens per target step of greedy chains


@dataclass
class DistillConfig:
    model: ModelSection = field(default_factory=ModelSection)
    student: StudentSection = field(default_factory=StudentSection)
    data: DataSection = field(default_factory=DataSection)
    prompts_file: str | None = None  # JSON / JSONL of prompts or conversations, instead of the prepared data
    gkd: GKDSection = field(default_factory=GKDSection)
    training: DistillTrainingSection = field(default_factory=DistillTrainingSection)
    eval: DistillEvalSection = field(default_factory=DistillEvalSection)
    hub: HubSection = field(default_factory=HubSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_distill_config(path: str | Path | None, overrides: list[str] | None = None) -> DistillConfig:
    """Read a distillation recipe and apply ``section.key=value`` overrides; unknown keys raise ``ConfigError``."""
    import yaml

    tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else {}
    tree = tree or {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    config = build_section(DistillConfig, tree, "the distillation config")
    _coerce_floats(config)
    problems = config_problems(config)
    if problems:
        raise ConfigError("Invalid distillation config: " + "; ".join(problems) + ".")
    return config


def _coerce_floats(section) -> None:
    """YAML 1.1 reads ``5e-5`` (no dot) as a string: turn such values of float fields into floats."""
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        if dataclasses.is_dataclass(value):
            _coerce_floats(value)
        elif isinstance(value, str) and str(spec.type).startswith("float"):
            try:
                setattr(section, spec.name, float(value))
            except ValueError as error:
                raise ConfigError(f"{spec.name} must be a number, got {value!r}.") from error


def config_problems(config: DistillConfig) -> list[str]:
    """Human-readable problems with a distillation config (empty when it is valid)."""
    problems = [] if config.model.name_or_path else ["model.name_or_path (the target) is required"]
    student = config.student
    if (student.name_or_path is None) == (student.layers is None):
        problems.append("set exactly one of student.name_or_path (a smaller model) and student.layers "
                        "(the target's first n layers)")
    if student.lora and student.name_or_path is None:
        problems.append("student.lora trains adapters on a separate student model (student.name_or_path); a student "
                        "cut from the target's layers trains all its weights")
    if not 0 <= config.gkd.beta <= 1 or not 0 <= config.gkd.lmbda <= 1:
        problems.append("gkd.beta and gkd.lmbda must be between 0 and 1")
    if config.gkd.temperature <= 0 or config.gkd.max_new_tokens < 1:
        problems.append("gkd.temperature must be > 0 and gkd.max_new_tokens >= 1")
    if config.training.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        problems.append("training.mixed_precision must be auto, no, bf16 or fp16")
    if config.hub.push and not config.hub.repo_id:
        problems.append("hub.push needs hub.repo_id")
    if config.prompts_file is None:
        problems += data_section_problems(config.data)
    return problems


# ---------------------------------------------------------------------------- the student
def student_from_target(target, num_layers: int):
    """A model of ``target``'s class and configuration with only its first ``num_layers`` decoder layers, holding
    copies of the target's embeddings, those layers, the final norm and the LM head (still tied to the embeddings
    when the target ties them). An ordinary ``PreTrainedModel``: ``save_pretrained`` / ``from_pretrained`` work,
    and ``hf_spec.DraftModelDrafter`` drafts with it."""
    total = target.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise UnsupportedError(f"A student cut from this {total}-layer target keeps 1 to {total - 1} of its layers, "
                               f"got student.layers={num_layers}.")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    if getattr(config, "max_window_layers", None) is not None:  # Qwen2: layers from this index slide
        config.max_window_layers = min(config.max_window_layers, num_layers)
    student = type(target)(config).to(target.dtype)
    kept = {name: tensor for name, tensor in target.state_dict().items() if _in_first_layers(name, num_layers)}
    student.load_state_dict(kept, strict=True)  # copies into the new (possibly tied) parameters
    student.generation_config = copy.deepcopy(target.generation_config)
    return student.to(target.device)


def _in_first_layers(name: str, num_layers: int) -> bool:
    match = _LAYER_INDEX.search(name)
    return match is None or int(match.group(1)) < num_layers


def load_student(config: DistillConfig, target, tokenizer):
    """The student model and its peft ``LoraConfig`` (or ``None``), checked against the target's vocabulary."""
    from ..models import load_model

    student_config = config.student
    if student_config.layers is not None:
        student = student_from_target(target, student_config.layers).to(getattr(torch, student_config.dtype))
        return student, None
    student, student_tokenizer = load_model(student_config.name_or_path, getattr(torch, student_config.dtype),
                                            prepare=False)
    check_same_vocabulary(tokenizer, student_tokenizer, target, student, student_config.name_or_path)
    return student, lora_config(student_config.lora)


def check_same_vocabulary(tokenizer, student_tokenizer, target, student, student_name: str) -> None:
    """A draft's tokens are verified as the target's: both must use one vocabulary (GKD compares full
    next-token distributions, and ``DraftModelDrafter`` passes token ids straight to the target)."""
    target_size = target.config.get_text_config().vocab_size
    student_size = student.config.get_text_config().vocab_size
    if target_size != student_size or tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UnsupportedError(
            f"The student {student_name!r} does not share the target's vocabulary (logits {student_size} vs "
            f"{target_size} wide, or different token ids): distil a model of the same family and tokenizer, "
            "or cut one from the target with student.layers.")


def lora_config(settings: dict | None):
    """peft's ``LoraConfig`` for a causal LM from ``{r, alpha, dropout, target_modules}`` (or ``None``)."""
    if not settings:
        return None
    from peft import LoraConfig

    known = {"r", "alpha", "dropout", "target_modules"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in student.lora; valid keys: {sorted(known)}.")
    return LoraConfig(r=settings.get("r", 16), lora_alpha=settings.get("alpha", 32),
                      lora_dropout=settings.get("dropout", 0.0),
                      target_modules=settings.get("target_modules", "all-linear"), task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------- prompt datasets
def prompt_row(tokenizer, item) -> dict:
    """One row for TRL's ChatML collator: ``input_ids`` and a ``completion_mask`` (1 on reply tokens).

    ``item`` is a plain prompt (a string, or ``{"prompt": str}``) or a conversation (a list of messages, or
    ``{"messages": [...]}``) whose last assistant turn, if any, is the reply. A plain prompt is chat-templated
    as one user turn when the tokenizer has a chat template. A row without a reply has an all-zero mask: only
    on-policy (``gkd.lmbda = 1``) or teacher-sampled (``gkd.seq_kd``) batches can train on it.
    """
    if isinstance(item, dict):
        item = item.get("messages", item.get("prompt"))
    if isinstance(item, str):
        if tokenizer.chat_template:
            item = [{"role": "user", "content": item}]
        else:
            ids = tokenizer(item, add_special_tokens=True)["input_ids"]
            return {"input_ids": ids, "completion_mask": [0] * len(ids)}
    if not isinstance(item, list) or not item or not all(isinstance(m, dict) and "role" in m for m in item):
        raise UnsupportedError(f"A prompt is a string, {{'prompt': str}}, a list of messages or {{'messages': [...]}}; "
                               f"got {str(item)[:80]!r}.")
    has_reply = item[-1]["role"] == "assistant"
    prompt = item[:-1] if has_reply else item
    prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
    if not has_reply:
        return {"input_ids": prompt_ids, "completion_mask": [0] * len(prompt_ids)}
    full_ids = _chat_ids(tokenizer, item, add_generation_prompt=False)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise UnsupportedError("The chat template renders the reply's prompt differently inside the whole "
                               "conversation, so the reply's tokens cannot be told apart: pass prompts only.")
    return {"input_ids": full_ids, "completion_mask": [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))}


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)["input_ids"]
    return list(ids)


def prompt_dataset(tokenizer, items, max_prompt_tokens: int | None = None) -> list[dict]:
    """Rows (``prompt_row``) of ``items``, leaving out prompts longer than ``max_prompt_tokens``."""
    rows = [prompt_row(tokenizer, item) for item in items]
    return [row for row in rows if max_prompt_tokens is None or _prompt_length(row) <= max_prompt_tokens]


def _prompt_length(row: dict) -> int:
    mask = row["completion_mask"]
    return mask.index(1) if 1 in mask else len(mask)


def read_prompts_file(path: str | Path) -> list:
    """A JSON array or JSON-lines file of prompts / conversations (see ``prompt_row``)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def first_reply_row(input_ids: torch.Tensor, loss_mask: torch.Tensor,
                    max_reply_tokens: int | None = None) -> dict | None:
    """A prepared conversation cut after its first reply (and that reply after ``max_reply_tokens``): GKD prompts
    with the first user turn, and the collator marks everything after the prompt as the completion. A cut reply
    still holds the target's own token after each of its prefixes."""
    reply = loss_mask.nonzero()
    if len(reply) == 0:
        return None
    start = int(reply[0])
    end = start
    while end < len(loss_mask) and loss_mask[end] and (max_reply_tokens is None or end - start < max_reply_tokens):
        end += 1
    return {"input_ids": input_ids[:end].tolist(), "completion_mask": [0] * start + [1] * (end - start)}


def prepared_dataset(prepared, split: str, max_prompt_tokens: int | None = None,
                     max_reply_tokens: int | None = None) -> list[dict]:
    """Rows of one split of the data ``hf-spec prepare-data`` built (``prepare_data.PreparedData``)."""
    rows = []
    for example in prepared.dataset(split):
        row = first_reply_row(example["input_ids"], example["loss_mask"], max_reply_tokens)
        if row is not None and (max_prompt_tokens is None or _prompt_length(row) <= max_prompt_tokens):
            rows.append(row)
    return rows


def split_prompt_rows(config: DistillConfig, tokenizer, target) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): from ``prompts_file`` (split by a hash of each item's position, like
    conversations by their id) or from the prepared data (one process builds it if needed; in a multi-process
    launch it must be built beforehand with ``hf-spec prepare-data``, so no rank waits on another)."""
    from accelerate import PartialState

    from .data import is_heldout
    from .prepare_data import load_prepared_data, needs_target, prepare_data

    limit = config.gkd.max_prompt_tokens
    if config.prompts_file is not None:
        items = read_prompts_file(config.prompts_file)
        held = [is_heldout(str(index), config.data.seed, config.data.heldout_fraction) for index in range(len(items))]
        train = prompt_dataset(tokenizer, [item for item, h in zip(items, held) if not h], limit)
        heldout = prompt_dataset(tokenizer, [item for item, h in zip(items, held) if h], limit)
        return train, heldout
    data = dataclasses.replace(config.data, feature_layers=[], cache_hidden_states=False)  # GKD reads tokens only
    uses_target = target if needs_target(data) else None
    if PartialState().num_processes == 1:
        prepared = prepare_data(data, tokenizer, uses_target, log=logger.info)
    else:
        prepared = load_prepared_data(data, tokenizer, uses_target)
    # Off-policy replies are cut to the length of on-policy samples: the same cost and weight per batch.
    reply = config.gkd.max_new_tokens
    return prepared_dataset(prepared, "train", limit, reply), prepared_dataset(prepared, "heldout", limit, reply)


def check_rows_trainable(rows: list[dict], gkd: GKDSection) -> None:
    if not rows:
        raise ConfigError("The training prompts are empty: raise data.num_conversations, add prompts to "
                          "prompts_file, or raise gkd.max_prompt_tokens.")
    if gkd.lmbda < 1 and not gkd.seq_kd and not any(1 in row["completion_mask"] for row in rows):
        raise UnsupportedError("The prompts carry no replies, so off-policy batches would have nothing to train on: "
                               "set gkd.lmbda: 1 (on-policy only) or gkd.seq_kd: true (the teacher samples replies).")


# ---------------------------------------------------------------------------- acceptance
@torch.no_grad()
def target_continuations(target, prompts, max_new_tokens: int = 64) -> list[torch.Tensor]:
    """Each prompt followed by the target's greedy continuation (1-D token tensors)."""
    sequences = []
    for prompt in prompts:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1).to(target.device)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, temperature=None, top_p=None, top_k=None)
        sequences.append(out[0].cpu())
    return sequences


@torch.no_grad()
def greedy_matches(draft, prompts, continuations) -> list[torch.Tensor]:
    """Per continuation, a boolean per target token: does the draft's greedy next token, given the target's
    tokens before it (teacher forcing), equal it."""
    matches = []
    for prompt, sequence in zip(prompts, continuations):
        start = len(prompt)
        if len(sequence) <= start:
            matches.append(torch.zeros(0, dtype=torch.bool))
            continue
        ids = sequence.reshape(1, -1).to(draft.device)
        logits = draft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, start - 1:-1]
        matches.append((logits.argmax(-1).cpu() == sequence[start:]))
    return matches


def acceptance_rate(target, draft, prompts, max_new_tokens: int = 64, continuations=None) -> float:
    """Fraction of the target's greedy tokens that the draft predicts greedily (teacher forced, deterministic):
    the per-token acceptance of greedy speculative decoding with this draft. ``prompts`` are token id
    sequences; ``continuations`` (``target_continuations``) can be passed to reuse the target's decoding."""
    if continuations is None:
        continuations = target_continuations(target, prompts, max_new_tokens)
    matches = torch.cat(greedy_matches(draft, prompts, continuations))
    return float(matches.float().mean()) if len(matches) else 0.0


def tokens_per_step(matches: list[torch.Tensor], draft_length: int) -> float:
    """Tokens each target forward commits in greedy chain decoding with ``draft_length`` drafted tokens: the
    accepted run of matches plus the target's own (bonus or correction) token, replayed over the matches."""
    committed = steps = 0
    for row in matches:
        position = 0
        while position < len(row):
            accepted = 0
            while accepted < draft_length and position + accepted < len(row) and row[position + accepted]:
                accepted += 1
            step = min(accepted + 1, len(row) - position)
            committed, steps, position = committed + step, steps + 1, position + step
    return committed / steps if steps else 0.0


def acceptance_report(target, draft, prompts, continuations, draft_lengths) -> dict:
    matches = greedy_matches(draft, prompts, continuations)
    flat = torch.cat(matches) if matches else torch.zeros(0, dtype=torch.bool)
    return {"acceptance_rate": float(flat.float().mean()) if len(flat) else 0.0, "positions": len(flat),
            "tokens_per_step": {str(k): tokens_per_step(matches, k) for k in draft_lengths}}


# ---------------------------------------------------------------------------- training
def gkd_arguments(config: DistillConfig):
    """TRL's ``GKDConfig`` for this recipe (teacher generation and loss settings plus the training loop)."""
    from trl.experimental.gkd import GKDConfig

    training, gkd = config.training, config.gkd
    precision = training.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return GKDConfig(
        output_dir=trainer_dir(config), max_steps=training.max_steps or -1, num_train_epochs=training.epochs,
        per_device_train_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps, learning_rate=training.learning_rate,
        weight_decay=training.weight_decay, lr_scheduler_type=training.lr_scheduler, warmup_steps=training.warmup_steps,
        max_grad_norm=training.max_grad_norm, bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=training.gradient_checkpointing, logging_steps=training.log_every_steps,
        save_strategy="steps" if training.save_every_steps else "no", save_steps=training.save_every_steps or 500,
        report_to=training.report_to or "none", seed=training.seed, max_length=config.data.max_length,
        beta=gkd.beta, lmbda=gkd.lmbda, temperature=gkd.temperature, max_new_tokens=gkd.max_new_tokens,
        seq_kd=gkd.seq_kd, disable_tqdm=True, dataloader_num_workers=0,
        # On CPU-only machines every launch (DeepSpeed included) needs gloo: without it a DeepSpeed launch's
        # process group has one member per process and each rank trains alone (what make_accelerator does too).
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def trainer_dir(config: DistillConfig) -> str:
    return config.training.trainer_dir or f"{config.training.output_dir.rstrip('/')}.trainer"


def train_student(config: DistillConfig, target, tokenizer, student, peft_config, rows: list[dict]):
    """Run ``GKDTrainer`` (teacher = the frozen target); returns the trained student (LoRA merged), the logged
    losses, the optimizer steps taken and the trainer's accelerator."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDTrainer

    # TRL's ChatML collator reads pre-tokenized rows (input_ids + completion_mask: the prompt ends at the first 1)
    # but still looks up a "prompt" (or "messages") key first; the empty prompt text is never used.
    trainer = GKDTrainer(model=student, teacher_model=target, args=gkd_arguments(config),
                         train_dataset=Dataset.from_list([{**row, "prompt": ""} for row in rows]),
                         processing_class=tokenizer, peft_config=peft_config)
    # transformers counts each batch's loss tokens on the data's labels, before GKD replaces the batch with sampled
    # completions: for prompt-only rows that count is 0 (a NaN loss), otherwise it is the wrong count. Without it,
    # the GKD loss is the mean over the batch actually trained on, divided by the accumulation steps.
    trainer.model_accepts_loss_kwargs = False
    trainer.train(resume_from_checkpoint=True if config.training.resume else None)
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    model = trainer.accelerator.unwrap_model(trainer.model)
    if zero_stage(trainer.accelerator) == 3:  # every rank holds shards: gather them into a whole copy
        model = unsharded_copy(model, config, target, tokenizer, peft_config)
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the student's weights
        model = model.merge_and_unload()
    return model.eval(), losses, trainer.state.global_step, trainer.accelerator


def unsharded_copy(sharded, config: DistillConfig, target, tokenizer, peft_config):
    """A freshly built student (LoRA-wrapped like the trained one) holding ``sharded``'s gathered ZeRO-3 weights.
    Collective: every rank must call it."""
    state = gathered_state_dict(sharded)
    fresh, _ = load_student(config, target, tokenizer)
    if peft_config is not None:
        from peft import get_peft_model

        fresh = get_peft_model(fresh, peft_config)
    missing, _ = fresh.load_state_dict(state, strict=False)
    tied = getattr(fresh.config.get_text_config(), "tie_word_embeddings", False)
    missing = [name for name in missing if not (tied and name.endswith("lm_head.weight"))]
    if missing:
        raise RuntimeError(f"Gathering the ZeRO-3 student missed {missing[:5]}: the export would be incomplete.")
    if tied:
        fresh.tie_weights()
    return fresh


# ---------------------------------------------------------------------------- export
def save_student(student, tokenizer, folder: str | Path, card: str | None = None) -> Path:
    """Write the student (safetensors + config + generation config + tokenizer + README) into a fresh folder
    beside ``folder`` and rename it onto ``folder``: an interrupted save never leaves a half-written model."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    previous = folder.parent / f".{folder.name}.previous"
    try:
        student.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
        shutil.rmtree(previous, ignore_errors=True)
        if folder.exists():
            os.replace(folder, previous)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
    return folder


def model_card(config: DistillConfig, summary: dict) -> str:
    """The student's card (``cards/distill.md``): YAML front matter (base model, tags, training settings)."""
    from .hub import render_model_card
    from .provenance import dataset_ids, hub_model_id, published_model_name

    student_base = config.student.name_or_path or config.model.name_or_path
    card_data = {"library_name": "transformers", "tags": CARD_TAGS,
                 "base_model": hub_model_id(student_base), "pipeline_tag": "text-generation",
                 "distillation": {"teacher": published_model_name(config.model.name_or_path),
                                  **dataclasses.asdict(config.gkd), "student_layers": config.student.layers,
                                  "lora": config.student.lora, "steps": summary["steps"]}}
    if config.prompts_file is None and dataset_ids(config.data.source):
        card_data["datasets"] = dataset_ids(config.data.source)
    if config.hub.license:
        card_data["license"] = config.hub.license
    repo_id = config.hub.repo_id or Path(config.training.output_dir).name
    return render_model_card(CARD_TEMPLATE, card_data, repo_id=repo_id,
                             target=published_model_name(config.model.name_or_path),
                             student_base=published_model_name(student_base), config=config, summary=summary)


# ---------------------------------------------------------------------------- one run
def distill(config: DistillConfig) -> dict:
    """Distil ``config.student`` from the target ``config.model`` with GKD, measure held-out acceptance before and
    after, save the student to ``training.output_dir`` (plus ``distill.json``) and push it if ``hub.push``."""
    from accelerate.utils import set_seed

    from .hub import atomic_write_text, push_folder_to_hub
    from .models import load_target

    problems = config_problems(config)
    if problems:
        raise ConfigError("Invalid distillation config: " + "; ".join(problems) + ".")
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    set_seed(config.training.seed)
    target, tokenizer = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows, heldout_rows = split_prompt_rows(config, tokenizer, target)
    check_rows_trainable(train_rows, config.gkd)
    student, peft_config = load_student(config, target, tokenizer)

    from accelerate import PartialState

    # Acceptance is measured by the main process only (the others would repeat it).
    count = config.eval.heldout_prompts if PartialState().is_main_process else 0
    heldout = [row["input_ids"][:_prompt_length(row)] for row in heldout_rows[:count]]
    continuations = target_continuations(target, heldout, config.eval.max_new_tokens) if heldout else []
    before = acceptance_report(target, student, heldout, continuations, config.eval.draft_lengths) if heldout else None

    started = time.perf_counter()
    student, losses, steps, accelerator = train_student(config, target, tokenizer, student, peft_config, train_rows)
    train_seconds = time.perf_counter() - started
    summary = {"target": config.model.name_or_path, "student": config.student.name_or_path or
               f"first {config.student.layers} layers of the target", "steps": steps, "train_examples": len(train_rows),
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "losses": losses, "train_seconds": train_seconds, "processes": accelerator.num_processes,
               "zero_stage": zero_stage(accelerator)}
    if not accelerator.is_main_process:
        return summary
    student.to(target.device)
    after = acceptance_report(target, student, heldout, continuations, config.eval.draft_lengths) if heldout else None
    summary.update({"heldout_prompts": len(heldout), "acceptance_before": before, "acceptance_after": after})
    folder = save_student(student, tokenizer, config.training.output_dir, model_card(config, summary))
    atomic_write_text(folder / "distill.json", json.dumps(summary, indent=2, default=str) + "\n")
    if config.hub.push:
        message = f"Draft model distilled from {config.model.name_or_path}"
        summary["hub_commit"] = push_folder_to_hub(folder, config.hub.repo_id, private=config.hub.private,
                                                   commit_message=message)
    return summary


def main(argv: list[str] | None = None) -> dict:
    """``recipes/distill_draft.py --config configs/distill/<model>.yaml [--set section.key=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Distil a draft model from its target with TRL's GKD trainer; "
                                                 "launch with accelerate launch.")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/distill/smollm2-135m-instruct.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set gkd.beta=0.5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = distill(load_distill_config(args.config, args.set))
    print(json.dumps({key: value for key, value in summary.items() if key != "losses"}, indent=2, default=str))
    return summary
