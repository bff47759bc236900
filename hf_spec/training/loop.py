"""The training loop every method shares (single process, DDP, DeepSpeed ZeRO-2/3; GPUs or CPUs over gloo).

The objective is any ``nn.Module`` whose ``forward(**batch)`` returns a dict with a scalar ``loss`` (and
any other tensors, which are averaged over the accumulation window and the ranks and logged).
Gradient accumulation, clipping, the LR schedule, mixed precision and sharding are accelerate's and
DeepSpeed's; ``train`` adds a progress bar, ``metrics.jsonl`` (cut back to the resumed step, so no step
is logged twice), accelerate trackers, and checkpoints (``checkpoints.py``) that ``resume="auto"``
picks up exactly where they stopped. Nothing here knows about any draft method.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoints import (
    CHECKPOINT_MARKER,
    TrainingProgress,
    check_resumable,
    checkpoint_dirs,
    checkpoint_to_resume,
    keep_frozen_weights_out_of_checkpoints,
    save_checkpoint,
)
from .config import TrainingSection
from .hub import atomic_write_text
from .launch import uses_deepspeed

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss (over ranks and accumulation) per step
    resumed_from: str | None = None


def build_optimizer(param_groups: list[dict], training: TrainingSection) -> torch.optim.Optimizer:
    """AdamW (a torch optimizer: DeepSpeed takes it as a client optimizer, no fused-op compilation)."""
    return torch.optim.AdamW(param_groups, lr=training.learning_rate, betas=tuple(training.adam_betas),
                             weight_decay=training.weight_decay)


def train(accelerator, objective: torch.nn.Module, param_groups: list[dict], train_dataset, collator,
          training: TrainingSection, on_step=None, fingerprint: dict[str, str] | None = None,
          ) -> tuple[TrainResult, torch.nn.Module]:
    """Train ``objective`` on ``train_dataset``; returns the result and the prepared objective.

    ``on_step(unwrapped_objective, step)`` runs before each optimizer step's micro-batches (e.g. a loss
    warm-up). Resumes from ``training.resume``; saves every ``training.save_every_steps`` and at the end.
    ``fingerprint`` (``recipe_fingerprint``) is stored with every checkpoint and must match to resume.
    """
    from transformers import get_scheduler

    generator = torch.Generator().manual_seed(training.seed)
    dataloader = DataLoader(train_dataset, batch_size=training.micro_batch_size, shuffle=True,
                            collate_fn=collator, generator=generator, drop_last=False)
    batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_process / training.gradient_accumulation_steps))
    total_steps = training.max_steps or training.epochs * steps_per_epoch
    optimizer = build_optimizer(param_groups, training)
    scheduler = get_scheduler(training.lr_scheduler, optimizer,
                              num_warmup_steps=training.warmup_steps * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    objective, optimizer, dataloader, scheduler = accelerator.prepare(objective, optimizer, dataloader, scheduler)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    result = TrainResult(steps=total_steps)
    resume = checkpoint_to_resume(training)
    keep_frozen_weights_out_of_checkpoints(accelerator)
    if resume is not None:
        check_resumable(accelerator, resume, fingerprint)
        accelerator.load_state(str(resume), **({"load_module_strict": False} if uses_deepspeed(accelerator)
                                                else {"strict": False}))
        result.resumed_from = str(resume)
        accelerator.print(f"Resumed from {resume} at step {progress.step}.")
    if training.report_to:
        accelerator.init_trackers("hf_spec", config={"training": asdict(training)})

    unwrapped = accelerator.unwrap_model(objective)
    metrics_path = Path(training.output_dir) / METRICS_FILE
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, progress.step)
    bar = tqdm(total=total_steps, initial=progress.step, desc="training", disable=not accelerator.is_local_main_process)
    objective.train()
    window: list[dict[str, torch.Tensor]] = []
    while progress.step < total_steps:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(progress.epoch)
        batches = accelerator.skip_first_batches(dataloader, progress.batches_in_epoch) \
            if progress.batches_in_epoch else dataloader
        for batch in batches:
            if on_step is not None:
                on_step(unwrapped, progress.step)
            with accelerator.accumulate(objective):
                outputs = objective(**batch)
                accelerator.backward(outputs["loss"])
                if accelerator.sync_gradients and not uses_deepspeed(accelerator):
                    accelerator.clip_grad_norm_([p for p in objective.parameters() if p.requires_grad],
                                                training.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            window.append({name: value.detach().float() for name, value in outputs.items()})
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            record = _reduce_window(accelerator, window, scheduler, progress.step)
            window = []
            result.losses.append(record["loss"])
            _log(accelerator, training, metrics_path, record, bar)
            if training.save_every_steps and progress.step % training.save_every_steps == 0:
                save_checkpoint(accelerator, training, progress, fingerprint)
            if progress.step >= total_steps:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()
    if not any(json.loads((path / CHECKPOINT_MARKER).read_text())["step"] == progress.step
               for path in checkpoint_dirs(training.output_dir)):
        save_checkpoint(accelerator, training, progress, fingerprint)
    return result, objective


def truncate_metrics(metrics_path: Path, last_step: int) -> None:
    """Keep the records of steps ``<= last_step`` in ``metrics.jsonl`` (a resumed run logs the later ones again)."""
    if not metrics_path.is_file():
        return
    lines = metrics_path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _record_step(line) <= last_step]
    if len(kept) != len(lines):
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> float:
    """The step a ``metrics.jsonl`` line records; infinity for a line cut by a crash mid-write (dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _reduce_window(accelerator, window, scheduler, step) -> dict:
    """Mean of each output over the accumulation window and over ranks, as plain Python numbers."""
    record = {"step": step}
    for name in window[0]:
        local = torch.stack([item[name] for item in window]).mean(0).to(accelerator.device)
        value = accelerator.reduce(local, reduction="mean").cpu()
        record[name] = value.item() if value.dim() == 0 else value.tolist()
    record["lr"] = scheduler.get_last_lr()[0]
    return record


def _log(accelerator, training: TrainingSection, metrics_path: Path, record: dict, bar) -> None:
    bar.update(1)
    if not accelerator.is_main_process:
        return
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with metrics_path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    if record["step"] % max(training.log_every_steps, 1) == 0 or record["step"] == 1:
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if training.report_to:
            scalars = {key: value for key, value in record.items() if isinstance(value, float)}
            accelerator.log(scalars, step=record["step"])
