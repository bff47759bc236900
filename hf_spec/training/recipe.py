"""Any registered draft method end to end: data, training, held-out evaluation, export, model card, Hub.

Entry point of ``recipes/train.py`` (and of the per-method aliases such as ``recipes/train_medusa.py``).
Everything method-specific comes from the method's ``TrainingMethod`` (``hf_spec.training.methods``);
this module only sequences the shared steps:

1. launch (``launch.py``) and load the target; read the data ``prepare-data`` built (``prepare_data.py``;
   a single process builds it first if needed, several processes only read it);
2. ``method.build`` -> objective; ``loop.train`` (checkpoints, resume, ``metrics.jsonl``);
3. ``method.evaluate`` on the held-out split;
4. ``method.export_state`` on every rank, a check that all ranks hold the same weights, ``method.save``;
5. ``eval.json``, ``recipe.yaml`` and the model card (``cards/<method>.md``); optionally decode held-out
   prompts with the exported drafter (``method.load_drafter``) and push the folder to the Hub.

Output folder (``training.output_dir``)::

    <the method's files>             e.g. Medusa: config.json, model.safetensors (+ adapter/)
    README.md                        model card
    eval.json                        evaluation, measured tau/speedup, data, timings, launch, precision
    recipe.yaml                      the resolved recipe configuration (reruns with --config recipe.yaml)
    metrics.jsonl, checkpoints/      training log and resumable accelerate states (not published)
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from ..wheels import file_sha256
from .checkpoints import recipe_fingerprint, replicas_identical
from .config import ConfigError, RecipeConfig
from .data import PaddingCollator
from .evaluate import measure_generation
from .hub import atomic_write_text, push_folder_to_hub, render_model_card
from .launch import LaunchError, make_accelerator, zero_stage
from .loop import train
from .methods import TrainingMethod, get_method
from .models import load_target, unpartitioned
from .prepare_data import load_prepared_data, needs_target, prepare_data
from .provenance import dataset_ids, hub_model_id, launch_command, precision_description, published_model_name

logger = logging.getLogger(__name__)
PUBLISH_IGNORE = ["checkpoints/*", "metrics.jsonl", "*.tmp"]


def run(config: RecipeConfig, expected_processes: int | None = None, prepare_data_only: bool = False,
        argv: list[str] | None = None) -> dict:
    """Train, evaluate and export ``config.method`` as ``config`` says; returns the evaluation summary.

    ``argv`` is the script's command line, recorded (as the ``accelerate launch`` that reruns it) in the card.
    """
    from accelerate.utils import set_seed

    method = get_method(config.method)
    training = config.training
    if training.num_threads:
        torch.set_num_threads(training.num_threads)
    accelerator = make_accelerator(training, expected_processes)
    set_seed(training.seed)
    with target_loading(accelerator, config):
        target, tokenizer = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
    target.to(accelerator.device)
    prepared_data = training_data(accelerator, config, target, tokenizer, build=prepare_data_only)
    data_info = prepared_data.info()
    if prepare_data_only:
        accelerator.print(json.dumps(data_info, indent=2, default=str))
        return {"data": data_info}
    features = method.batch_features(config)
    train_dataset, heldout_dataset = (prepared_data.dataset(split, features) for split in ("train", "heldout"))
    for split, dataset in (("training", train_dataset), ("held-out", heldout_dataset)):
        if len(dataset) == 0:
            raise ConfigError(f"The {split} split of the data is empty ({data_info['train']['examples']} training and "
                              f"{data_info['heldout']['examples']} held-out examples): raise data.num_conversations, "
                              "or set data.heldout_fraction so that both splits hold conversations.")

    parts = method.build(config, target)
    collator = PaddingCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    started = time.perf_counter()
    result, prepared = train(accelerator, parts.objective, parts.parameter_groups,
                             train_dataset, collator, training, on_step=parts.on_step,
                             fingerprint=weights_fingerprint(config))
    train_seconds = time.perf_counter() - started

    heldout = accelerator.prepare(DataLoader(heldout_dataset,
                                             batch_size=training.micro_batch_size, collate_fn=collator))
    evaluation = method.evaluate(accelerator, prepared, heldout, config)
    command = launch_command(accelerator.distributed_type, accelerator.num_processes, zero_stage(accelerator),
                             not torch.cuda.is_available(), argv or sys.argv)
    summary = export(accelerator, method, prepared, config, evaluation, result, data_info, train_seconds, command)
    # The distributed part ends here: no rank idles in a collective while the main one decodes and uploads.
    accelerator.end_training()
    if not accelerator.is_main_process:
        return summary
    if config.eval.generate_prompts:
        with unpartitioned():
            summary["generation"] = generation_check(method, config, heldout_dataset)
        write_outputs(config, summary)
    if config.hub.push:
        summary["hub_commit"] = publish(config, summary)
    return summary


# ---------------------------------------------------------------------------- data and fingerprints
def training_data(accelerator, config: RecipeConfig, target, tokenizer, build: bool = False):
    """The recipe's prepared data. One process builds or finishes it when needed (``prepare_data``);
    several processes only read it, so that no rank waits in a collective while another one builds data:
    a missing build is an error that names the ``prepare-data`` command."""
    uses_target = target if needs_target(config.data) else None
    if build and accelerator.num_processes > 1:
        raise LaunchError("--prepare_data_only runs in one process: run hf-spec prepare-data --config <recipe> "
                          "(or this script without accelerate's multi-process settings).")
    if build or accelerator.num_processes == 1:
        return prepare_data(config.data, tokenizer, uses_target, log=logger.info,
                            progress=accelerator.is_local_main_process)
    return load_prepared_data(config.data, tokenizer, uses_target)


def weights_fingerprint(config: RecipeConfig) -> dict[str, str]:
    """Hashes of the sections that shape the trained weights (model, data and the method's own, with the contents
    of the files the method reads, e.g. a draft vocabulary): a checkpoint resumes only under the same ones.
    ``data.cache_dir`` only says where the data is kept, so it is left out."""
    data = {name: value for name, value in asdict(config.data).items() if name != "cache_dir"}
    files = {str(path): file_sha256(Path(path)) for path in get_method(config.method).input_files(config)}
    return recipe_fingerprint({"model": config.model, "data": data, **config.method_sections(),
                               **({"files": files} if files else {})})



def target_loading(accelerator, config: RecipeConfig):
    """Every rank loads the whole target (ZeRO-3 shards it in ``prepare()``), unless ``zero3_init_flag: true``
    asks DeepSpeed to shard it while loading (for targets too big for one rank's memory)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not plugin.zero3_init_flag or zero_stage(accelerator) != 3:
        return unpartitioned()
    if needs_target(config.data):
        raise LaunchError("zero3_init_flag: true shards the target as it loads, but self-distilled data and cached "
                          "features are found by a fingerprint of the target's whole weights. Set zero3_init_flag: "
                          "false in the accelerate config.")
    return nullcontext()


# ---------------------------------------------------------------------------- export
def export(accelerator, method: TrainingMethod, prepared, config: RecipeConfig, evaluation: dict, result,
           data_info: dict, train_seconds: float, command: str | None) -> dict:
    """Gather the trained weights, check every rank holds the same, and write the output folder."""
    states = method.export_state(accelerator, prepared, config)
    everything = {f"{part}/{name}": tensor for part, state in states.items() for name, tensor in state.items()}
    identical, digests = replicas_identical(accelerator, everything)
    if not identical:
        raise RuntimeError(f"Ranks ended with different trained weights (digests {digests}); refusing to export.")
    summary = {
        "method": method.title(config),
        "base_model": config.model.name_or_path,
        "processes": accelerator.num_processes,
        "distributed": str(accelerator.distributed_type),
        "zero_stage": zero_stage(accelerator),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "train_seconds": train_seconds,
        "precision": precision_description(accelerator.mixed_precision, config.model.dtype),
        "weights_digest": digests[0],
        "replicas_identical": identical,
        "data": data_info,
        "evaluation": evaluation,
        "hardware": hardware_description(),
        "command": command,
    }
    if accelerator.is_main_process:
        method.save(Path(config.training.output_dir), accelerator.unwrap_model(prepared), states, config, evaluation)
        write_outputs(config, summary)
    accelerator.wait_for_everyone()
    return summary


def write_outputs(config: RecipeConfig, summary: dict) -> None:
    folder = Path(config.training.output_dir)
    atomic_write_text(folder / "eval.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(folder / "recipe.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(folder / "README.md", model_card(config, summary))


def hardware_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def model_card(config: RecipeConfig, summary: dict) -> str:
    """Render the method's card template (``hf_spec/training/cards/``) for this run.

    Every template gets ``repo_id``, ``method`` (the title), ``base_model``, ``data``, ``training``,
    ``data_info``, ``evaluation``, ``generation``, ``summary``, ``top_k`` and the method's own sections by
    name (e.g. ``medusa``), plus ``method.card_values``.
    """
    method = get_method(config.method)
    card_data = {"library_name": "hf_spec", "tags": method.card_tags(config),
                 "base_model": hub_model_id(config.model.name_or_path)}
    if dataset_ids(config.data.source):
        card_data["datasets"] = dataset_ids(config.data.source)
    if config.hub.license:
        card_data["license"] = config.hub.license
    template = Path(method.card_template)  # a file in hf_spec/training/cards/, or a path (methods living elsewhere)
    return render_model_card(
        template.name, card_data, template_dir=template.parent if template.is_absolute() else None,
        repo_id=config.hub.repo_id or Path(config.training.output_dir).name, method=summary["method"],
        base_model=published_model_name(config.model.name_or_path), data=config.data, training=config.training,
        data_info=summary["data"], evaluation=summary["evaluation"], generation=summary.get("generation"),
        summary=summary, top_k=config.eval.top_k, **config.method_sections(), **method.card_values(config, summary),
    )


# ---------------------------------------------------------------------------- after training
def heldout_prompts(heldout, count: int) -> list[torch.Tensor]:
    """The chat-templated first user turn of ``count`` held-out conversations (up to the first reply)."""
    prompts = []
    for index in range(min(count, len(heldout))):
        example = heldout[index]
        first_reply = int(example["loss_mask"].nonzero()[0])
        prompts.append(example["input_ids"][None, :first_reply])
    return prompts


def generation_check(method: TrainingMethod, config: RecipeConfig, heldout) -> dict:
    """Rebuild target and drafter from the exported files, and decode held-out prompts plainly and speculatively."""
    target, drafter = method.load_drafter(config, Path(config.training.output_dir))
    measured = measure_generation(target, drafter, heldout_prompts(heldout, config.eval.generate_prompts),
                                  config.eval.generate_max_new_tokens)
    return {**measured, **method.generation_details(drafter)}


def publish(config: RecipeConfig, summary: dict) -> str:
    return push_folder_to_hub(config.training.output_dir, config.hub.repo_id, private=config.hub.private,
                              commit_message=f"{summary['method']} drafter for {config.model.name_or_path}",
                              ignore_patterns=PUBLISH_IGNORE)


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None, method: str | None = None) -> dict:
    """``recipes/train.py``: ``--config configs/<method>/<model>.yaml [--set section.key=value ...]``.

    ``method`` fixes the method for a per-method entry point (``recipes/train_medusa.py``); a recipe for
    another method is then refused.
    """
    import argparse

    from .config import load_config

    trains = f"{method} draft heads" if method else "a draft method (the recipe's `method:`)"
    parser = argparse.ArgumentParser(description=f"Train {trains}; launch with accelerate launch.")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/medusa/smollm2-135m.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set training.max_steps=100")
    parser.add_argument("--expected_processes", type=int, default=None,
                        help="fail unless exactly this many processes run")
    parser.add_argument("--prepare_data_only", action="store_true",
                        help="build (and cache) the datasets, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.set, method=method)
    return run(config, expected_processes=args.expected_processes, prepare_data_only=args.prepare_data_only,
               argv=sys.argv if argv is None else [sys.argv[0], *argv])
