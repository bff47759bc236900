"""The accelerate glue every draft-head recipe shares: launch checks, the training loop, checkpoints.

One loop serves single-process, DDP, and DeepSpeed ZeRO-2/3 runs, on GPUs or on CPUs (gloo): the
objective is any ``nn.Module`` whose ``forward(**batch)`` returns a dict with a scalar ``loss`` (and
any other tensors, which are logged). Gradient accumulation, clipping, the LR schedule, mixed
precision and sharding are accelerate's and DeepSpeed's; this module adds what recipes need around
them:

- ``make_accelerator``: gloo for DeepSpeed on CPU, seedable samplers (so a resumed run sees the
  same batches), DeepSpeed ``auto`` values filled from the recipe, and a loud failure when the
  number of processes is not what was launched (``check_world_size``).
- ``train``: the loop, with a progress bar, ``metrics.jsonl``, accelerate trackers, and
  ``save_state`` checkpoints that ``resume="auto"`` picks up exactly where they stopped. A checkpoint
  records a fingerprint of the recipe sections that shape the weights (``recipe_fingerprint``): a
  resume under a changed recipe is refused, and ``metrics.jsonl`` is cut back to the resumed step so
  no step is logged twice.
- ``gathered_state_dict`` / ``replicas_identical``: full tensors of (ZeRO-3 sharded) modules on every
  rank, and a check that all ranks hold the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import TrainingSection
from .hub import atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_MARKER = "hf_spec_checkpoint.json"
METRICS_FILE = "metrics.jsonl"


class LaunchError(RuntimeError):
    """The recipe was launched in a way that would silently train something else than asked."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed by this recipe (it was written for different settings)."""


# ============================================================================ accelerator
def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(training: TrainingSection, expected_processes: int | None = None):
    """An ``Accelerator`` for the launch at hand (CPU-only machines: gloo, also under DeepSpeed)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if not deepspeed_requested():  # ACCELERATE_USE_CPU would turn a DeepSpeed launch into plain MULTI_CPU
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and distributed else []
    accelerator = Accelerator(
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(training.mixed_precision),
        log_with=training.report_to or None,
        project_config=ProjectConfiguration(project_dir=training.output_dir, logging_dir=training.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
    )
    check_world_size(accelerator, expected_processes)
    fill_deepspeed_auto_values(accelerator, training)
    return accelerator


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_world_size(accelerator, expected_processes: int | None = None) -> None:
    """Fail when the processes running are not the processes that were launched.

    Catches ``accelerate launch --cpu --num_processes 2``, which starts ONE process (the launcher then
    exports ``MASTER_ADDR`` but no ``WORLD_SIZE``), a ``WORLD_SIZE`` that disagrees with the process
    group, and an explicit ``expected_processes`` that was not met.
    """
    running = accelerator.num_processes
    world_size = os.environ.get("WORLD_SIZE")
    problems = []
    if world_size is not None and int(world_size) != running:
        problems.append(f"WORLD_SIZE={world_size} but {running} process(es) joined the process group")
    if world_size is None and running == 1 and os.environ.get("MASTER_ADDR"):
        problems.append("the launcher was asked for several processes (MASTER_ADDR is set) but started one; "
                        "`accelerate launch --cpu --num_processes N` does that")
    if expected_processes is not None and expected_processes != running:
        problems.append(f"{expected_processes} processes were expected, {running} are running")
    if deepspeed_requested() and not uses_deepspeed(accelerator):
        problems.append("the launch asked for DeepSpeed but it is not active (ACCELERATE_USE_CPU=true disables it: "
                        "on CPU launch DeepSpeed configs without it)")
    if problems:
        raise LaunchError(
            "Launch mismatch: " + "; ".join(problems) + ". On CPU launch several processes with "
            "`ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/ddp.yaml ...` (or "
            "`--multi_gpu --num_processes N`), or with torchrun."
        )


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def fill_deepspeed_auto_values(accelerator, training: TrainingSection) -> None:
    """Give DeepSpeed's ``auto`` entries the recipe's values (accelerate would otherwise clip at 1.0)."""
    if not uses_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = training.max_grad_norm
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save", "auto") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = True


# ============================================================================ weights across ranks
def gathered_state_dict(module: torch.nn.Module, only_trainable: bool = False) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``module``'s parameters (and buffers) on every rank, ZeRO-3 shards gathered."""
    named = [(name, param) for name, param in module.named_parameters() if param.requires_grad or not only_trainable]
    sharded = [param for _, param in named if hasattr(param, "ds_id")]
    context = nullcontext()
    if sharded:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)
    with context:
        state = {name: param.detach().cpu().clone() for name, param in named}
    if not only_trainable:
        state.update({name: buffer.detach().cpu().clone() for name, buffer in module.named_buffers()})
    return state


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def replicas_identical(accelerator, state: dict[str, torch.Tensor]) -> tuple[bool, list[str]]:
    """Whether every rank holds the same ``state`` (compares SHA-256 digests gathered from all ranks)."""
    from accelerate.utils import gather_object

    digests = gather_object([state_digest(state)])
    return len(set(digests)) == 1, digests


# ============================================================================ checkpoints
@dataclass
class TrainingProgress:
    """Where training is: registered with accelerate so ``save_state`` / ``load_state`` carry it."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints (those with a marker), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    finished = [path for path in root.iterdir() if (path / CHECKPOINT_MARKER).is_file()]
    return sorted(finished, key=lambda path: json.loads((path / CHECKPOINT_MARKER).read_text())["step"])


def checkpoint_to_resume(training: TrainingSection) -> Path | None:
    if training.resume == "none":
        return None
    if training.resume == "auto":
        finished = checkpoint_dirs(training.output_dir)
        return finished[-1] if finished else None
    path = Path(training.resume)
    if not (path / CHECKPOINT_MARKER).is_file():
        raise FileNotFoundError(f"training.resume={training.resume!r} is not a finished hf_spec checkpoint "
                                f"(no {CHECKPOINT_MARKER}).")
    return path


def keep_frozen_weights_out_of_checkpoints(accelerator) -> None:
    """Checkpoints hold trainable weights (plus optimizer, scheduler, RNG, progress) but not the frozen target.

    DeepSpeed gets ``exclude_frozen_parameters`` at save time; other runs filter the state dicts in
    a save hook. Loading is then non-strict for the module (the frozen weights stay as loaded).
    """
    def drop_frozen(models, weights, output_dir):
        for model, state in zip(models, weights):
            trainable = {name for name, param in model.named_parameters() if param.requires_grad}  # same prefixes as state
            for name in [name for name in state if name not in trainable]:
                del state[name]

    accelerator.register_save_state_pre_hook(drop_frozen)


def launch_signature(accelerator) -> dict:
    """What a checkpoint's layout depends on: it can only be resumed by a launch with the same values."""
    return {"distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
            "zero_stage": zero_stage(accelerator)}


def recipe_fingerprint(sections: dict[str, object]) -> dict[str, str]:
    """SHA-256 (16 hex digits) of each recipe section, e.g. ``{"model": ..., "data": ..., "medusa": ...}``.

    Sections are dataclasses or plain mappings; the recipe decides which ones shape the trained weights
    (settings that only say where files go, such as a cache folder, are left out by the caller).
    """
    def digest(value) -> str:
        plain = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {name: digest(value) for name, value in sorted(sections.items())}


def check_resumable(accelerator, checkpoint: Path, fingerprint: dict[str, str] | None = None) -> None:
    """Refuse a checkpoint written by another launch layout or under other recipe settings."""
    marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    saved = {key: marker.get(key) for key in launch_signature(accelerator)}
    if saved != launch_signature(accelerator):
        raise LaunchError(
            f"{checkpoint} was written by a {saved} launch, this one is {launch_signature(accelerator)}: accelerate "
            "and DeepSpeed states only resume under the same launch. Relaunch the same way, or start afresh with "
            "--set training.resume=none (or another training.output_dir)."
        )
    check_same_recipe(checkpoint, marker.get("recipe_fingerprint"), fingerprint)


def check_same_recipe(checkpoint: Path, saved: dict[str, str] | None, current: dict[str, str] | None) -> None:
    """Raise ``ResumeError`` naming the recipe sections that changed since ``checkpoint`` was written."""
    if current is None:
        return
    if saved is None:
        logger.warning("%s records no recipe fingerprint (written by an older hf_spec): cannot check that the "
                       "recipe is unchanged.", checkpoint)
        return
    changed = sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))
    if changed:
        raise ResumeError(
            f"Refusing to resume {checkpoint}: the recipe changed since it was written (section(s) {changed} differ; "
            "the run's settings are in recipe.yaml beside it). Resuming would continue training something else than "
            "the checkpoint holds. Restore those settings, or train afresh into another training.output_dir "
            "(or with --set training.resume=none)."
        )


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


def save_checkpoint(accelerator, training: TrainingSection, progress: TrainingProgress,
                    fingerprint: dict[str, str] | None = None) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step-N``; the marker is written last, then old ones pruned."""
    path = Path(training.output_dir) / CHECKPOINTS_DIR / f"step-{progress.step:07d}"
    options = {"exclude_frozen_parameters": True} if uses_deepspeed(accelerator) else {}
    accelerator.save_state(str(path), **options)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {**progress.state_dict(), **launch_signature(accelerator), "recipe_fingerprint": fingerprint}
        (path / CHECKPOINT_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        for old in checkpoint_dirs(training.output_dir)[: -training.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


# ============================================================================ loop
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
            record = _reduce_window(accelerator, window, scheduler, unwrapped, progress.step)
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


def _reduce_window(accelerator, window, scheduler, unwrapped, step) -> dict:
    """Mean of each output over the accumulation window and over ranks, as plain Python numbers."""
    record = {"step": step}
    for name in window[0]:
        local = torch.stack([item[name] for item in window]).mean(0).to(accelerator.device)
        value = accelerator.reduce(local, reduction="mean").cpu()
        record[name] = value.item() if value.dim() == 0 else value.tolist()
    record["lr"] = scheduler.get_last_lr()[0]
    record["head_loss_scale"] = float(getattr(unwrapped, "head_loss_scale", 1.0))
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
