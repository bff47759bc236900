"""Checkpoints of a training run, and the trained weights across ranks.

- ``save_checkpoint`` / ``checkpoint_to_resume`` / ``check_resumable``: ``accelerator.save_state`` into
  ``<output_dir>/checkpoints/step-N`` with a marker written last (only finished checkpoints resume), the
  launch layout and a fingerprint of the recipe sections that shape the weights (``recipe_fingerprint``):
  a resume under another launch layout or a changed recipe is refused with the reason.
- ``keep_frozen_weights_out_of_checkpoints``: checkpoints hold what trains, not the frozen target.
- ``gathered_state_dict`` / ``replicas_identical``: full tensors of (ZeRO-3 sharded) modules on every
  rank, and a check that all ranks hold the same weights.

Nothing here knows about any draft method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import TrainingSection
from .launch import LaunchError, uses_deepspeed, zero_stage

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_MARKER = "hf_spec_checkpoint.json"


class ResumeError(ValueError):
    """A checkpoint cannot be resumed by this recipe (it was written for different settings)."""


# ---------------------------------------------------------------------------- weights across ranks
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


# ---------------------------------------------------------------------------- checkpoints
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
