"""Launching a training run: one ``Accelerator`` for single-process, DDP and DeepSpeed ZeRO-2/3, on GPUs or CPUs.

- ``make_accelerator``: gloo for DeepSpeed on CPU, seedable samplers (so a resumed run sees the same
  batches), DeepSpeed ``auto`` values filled from the recipe, and a loud failure when the number of
  processes is not what was launched (``check_world_size``).
- ``zero_stage`` / ``uses_deepspeed``: what the launch turned out to be.

Nothing here knows about any draft method.
"""

from __future__ import annotations

import os

import torch

from .config import TrainingSection


class LaunchError(RuntimeError):
    """The recipe was launched in a way that would silently train something else than asked."""


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
