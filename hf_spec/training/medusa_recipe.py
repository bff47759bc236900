"""Medusa-1 / Medusa-2 end to end: data, training, held-out evaluation, export, model card, Hub.

Entry point of ``recipes/train_medusa.py``; every piece lives in its own module of
``hf_spec.training`` and is shared with the other draft-head methods.

Output folder (``training.output_dir``)::

    config.json, model.safetensors   the heads: MedusaDrafter.from_pretrained(output_dir, target=model)
    adapter/                         Medusa-2 only: the PEFT LoRA adapter of the target
    README.md                        model card (rendered from model_cards/medusa.md)
    eval.json                        per-head accuracy, tau estimates, measured tau/speedup, data and timings
    recipe.yaml                      the resolved recipe configuration
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

from ..drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from .config import RecipeConfig
from .data import PaddingCollator, build_datasets, dataset_folder, load_build_info, training_columns
from .evaluate import evaluate_heads, measure_generation
from .hub import atomic_write_text, push_folder_to_hub, render_model_card
from .losses import warmup_factor
from .medusa_objective import MedusaObjective
from .models import load_target, resolve_model_path, unpartitioned
from .provenance import (
    dataset_ids,
    hub_model_id,
    launch_command,
    precision_description,
    publish_adapter_base_model,
    published_model_name,
)
from .trainer import (
    LaunchError,
    gathered_state_dict,
    make_accelerator,
    recipe_fingerprint,
    replicas_identical,
    train,
    zero_stage,
)

logger = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"
PUBLISH_IGNORE = ["checkpoints/*", "metrics.jsonl", "*.tmp"]


def run(config: RecipeConfig, expected_processes: int | None = None, prepare_data_only: bool = False,
        argv: list[str] | None = None) -> dict:
    """Train, evaluate and export Medusa heads as ``config`` says; returns the evaluation summary.

    ``argv`` is the script's command line, recorded (as the ``accelerate launch`` that reruns it) in the card.
    """
    from accelerate.utils import set_seed

    training = config.training
    if training.num_threads:
        torch.set_num_threads(training.num_threads)
    accelerator = make_accelerator(training, expected_processes)
    set_seed(training.seed)
    with target_loading(accelerator, config):
        target, tokenizer = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
    target.to(accelerator.device)  # self-distillation and hidden-state caching run on it before prepare()
    target_identity = target_fingerprint(config.model.name_or_path, target)
    with accelerator.main_process_first():
        datasets = build_datasets(config.data, tokenizer, target, target_identity,
                                  disable_progress=not accelerator.is_local_main_process)
    data_info = load_build_info(dataset_folder(config.data, tokenizer, target_identity))
    if prepare_data_only:
        accelerator.print(json.dumps(data_info, indent=2, default=str))
        return {"data": data_info}

    heads = MedusaHeads.for_target(target, num_heads=config.medusa.num_heads, num_layers=config.medusa.num_layers,
                                   share_lm_head=config.medusa.share_lm_head,
                                   base_model=published_model_name(config.model.name_or_path),
                                   medusa_version=config.medusa.version,
                                   adapter=ADAPTER_DIR if config.medusa.version == 2 else None,
                                   default_num_nodes=config.eval.tree_num_nodes)
    target.requires_grad_(False)
    if config.medusa.version == 2:
        target = add_lora(target, config)
    objective = MedusaObjective(target, heads, version=config.medusa.version, labels=config.data.labels,
                                head_loss_decay=training.head_loss_decay,
                                head_loss_weight=config.medusa2.head_loss_weight, lm_loss=config.medusa2.lm_loss)
    collator = PaddingCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    started = time.perf_counter()
    result, prepared = train(accelerator, objective, parameter_groups(objective, config),
                             training_columns(datasets["train"]), collator, training,
                             on_step=head_loss_warmup(config) if config.medusa.version == 2 else None,
                             fingerprint=weights_fingerprint(config))
    train_seconds = time.perf_counter() - started

    heldout = accelerator.prepare(DataLoader(training_columns(datasets["heldout"]),
                                             batch_size=training.micro_batch_size, collate_fn=collator))
    evaluation = evaluate_heads(accelerator, prepared, heldout, top_k=config.eval.top_k,
                                num_ranks=config.eval.num_ranks, tree_num_nodes=config.eval.tree_num_nodes)
    command = launch_command(accelerator.distributed_type, accelerator.num_processes, zero_stage(accelerator),
                             not torch.cuda.is_available(), argv or sys.argv)
    summary = export(accelerator, prepared, config, evaluation, result, data_info, train_seconds, command)
    # The distributed part ends here: no rank idles in a collective while the main one decodes and uploads.
    accelerator.end_training()
    if not accelerator.is_main_process:
        return summary
    if config.eval.generate_prompts:
        with unpartitioned():
            summary["generation"] = generation_check(config, datasets["heldout"])
        write_outputs(config, summary)
    if config.hub.push:
        summary["hub_commit"] = publish(config)
    return summary


# ---------------------------------------------------------------------------- model pieces
def target_fingerprint(name_or_path: str, target) -> str:
    return json.dumps({"name": name_or_path, "path": resolve_model_path(name_or_path),
                       "config": target.config.to_json_string(use_diff=True)}, sort_keys=True)


def weights_fingerprint(config: RecipeConfig) -> dict[str, str]:
    """Hashes of the sections that shape the trained weights (model, data, method): a checkpoint resumes only
    under the same ones. ``data.cache_dir`` only says where the data is kept, so it is left out."""
    data = {name: value for name, value in asdict(config.data).items() if name != "cache_dir"}
    return recipe_fingerprint({"model": config.model, "data": data, "medusa": config.medusa,
                               "medusa2": config.medusa2})


def target_loading(accelerator, config: RecipeConfig):
    """Every rank loads the whole target (ZeRO-3 shards it in ``prepare()``), unless ``zero3_init_flag: true``
    asks DeepSpeed to shard it while loading (for targets too big for one rank's memory)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not plugin.zero3_init_flag or zero_stage(accelerator) != 3:
        return unpartitioned()
    if config.data.self_distillation or config.data.cache_hidden_states:
        raise LaunchError("zero3_init_flag: true shards the target as it loads, but data.self_distillation and "
                          "data.cache_hidden_states run the whole target before training. Build the data first "
                          "(same recipe with --prepare_data_only, launched without DeepSpeed), or set "
                          "zero3_init_flag: false in the accelerate config.")
    return nullcontext()


def add_lora(target, config: RecipeConfig):
    """Medusa-2: wrap the frozen target with trainable LoRA adapters (peft)."""
    from peft import LoraConfig, get_peft_model

    lora = config.medusa2.lora
    return get_peft_model(target, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def parameter_groups(objective: MedusaObjective, config: RecipeConfig) -> list[dict]:
    """Heads at ``lr`` (Medusa-1) or ``lr * head_lr_multiplier`` (Medusa-2); LoRA adapters at ``lr``."""
    lr = config.training.learning_rate
    head_lr = lr * (config.medusa2.head_lr_multiplier if config.medusa.version == 2 else 1.0)
    groups = [{"params": [p for p in objective.heads.parameters() if p.requires_grad], "lr": head_lr}]
    adapters = [p for p in objective.target.parameters() if p.requires_grad]
    if adapters:
        groups.append({"params": adapters, "lr": lr})
    return groups


def head_loss_warmup(config: RecipeConfig):
    steps = config.medusa2.head_loss_warmup_steps

    def set_scale(objective, step):
        objective.head_loss_scale = warmup_factor(step + 1, steps)

    return set_scale


# ---------------------------------------------------------------------------- export
def export(accelerator, prepared, config: RecipeConfig, evaluation: dict, result, data_info: dict,
           train_seconds: float, command: str | None) -> dict:
    """Gather the trained weights, check every rank holds the same, and write the output folder."""
    unwrapped = accelerator.unwrap_model(prepared)
    heads_state = gathered_state_dict(unwrapped.heads)
    identical, digests = replicas_identical(accelerator, heads_state)
    if not identical:
        raise RuntimeError(f"Ranks ended with different head weights (digests {digests}); refusing to export.")
    adapter_state = gathered_state_dict(unwrapped.target, only_trainable=True) if config.medusa.version == 2 else None
    summary = {
        "method": f"Medusa-{config.medusa.version}",
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
        heads_config = MedusaConfig.from_dict({**unwrapped.heads.config.to_dict(),
                                               "head_rank_accuracies": evaluation["rank_accuracies"]})
        MedusaHeads(heads_config).save_pretrained(config.training.output_dir, state_dict=heads_state)
        if adapter_state is not None:
            adapter_dir = Path(config.training.output_dir) / ADAPTER_DIR
            unwrapped.target.save_pretrained(adapter_dir, state_dict=adapter_state)
            publish_adapter_base_model(adapter_dir, config.model.name_or_path)
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
    """Render ``model_cards/medusa.md`` for this run."""
    repo_id = config.hub.repo_id or Path(config.training.output_dir).name
    evaluation = summary["evaluation"]
    card_data = {"library_name": "hf_spec", "tags": ["speculative-decoding", "medusa", "hf_spec"],
                 "base_model": hub_model_id(config.model.name_or_path)}
    if dataset_ids(config.data.source):
        card_data["datasets"] = dataset_ids(config.data.source)
    if config.hub.license:
        card_data["license"] = config.hub.license
    return render_model_card(
        "medusa.md", card_data,
        repo_id=repo_id, method=summary["method"], base_model=published_model_name(config.model.name_or_path),
        medusa=config.medusa, medusa2=config.medusa2, data=config.data, training=config.training,
        data_info=summary["data"], evaluation=evaluation, heads=evaluation["heads"],
        generation=summary.get("generation"), summary=summary, top_k=config.eval.top_k,
        adapter_dir=ADAPTER_DIR,
    )


# ---------------------------------------------------------------------------- after training
def heldout_prompts(heldout, count: int) -> list[torch.Tensor]:
    """The chat-templated first user turn of ``count`` held-out conversations (up to the first reply)."""
    prompts = []
    for example in heldout.select(range(min(count, len(heldout)))):
        first_reply = example["loss_mask"].index(1)
        prompts.append(torch.tensor([example["input_ids"][:first_reply]]))
    return prompts


def generation_check(config: RecipeConfig, heldout) -> dict:
    """Reload the target and the exported heads, and decode held-out prompts plainly and speculatively."""
    target, _ = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
    target.config.use_cache = True
    if config.medusa.version == 2:
        from peft import PeftModel

        target = PeftModel.from_pretrained(target, Path(config.training.output_dir) / ADAPTER_DIR).merge_and_unload()
    drafter = MedusaDrafter.from_pretrained(config.training.output_dir, target=target)
    measured = measure_generation(target, drafter, heldout_prompts(heldout, config.eval.generate_prompts),
                                  config.eval.generate_max_new_tokens)
    measured["tree_nodes"] = len(drafter.tree_paths)
    return measured


def publish(config: RecipeConfig) -> str:
    return push_folder_to_hub(config.training.output_dir, config.hub.repo_id, private=config.hub.private,
                              commit_message=f"Medusa-{config.medusa.version} heads for {config.model.name_or_path}",
                              ignore_patterns=PUBLISH_IGNORE)


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from .config import load_config

    parser = argparse.ArgumentParser(description="Train Medusa-1/-2 heads (launch with accelerate launch).")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/medusa/smollm2-135m.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set training.max_steps=100")
    parser.add_argument("--expected_processes", type=int, default=None,
                        help="fail unless exactly this many processes run")
    parser.add_argument("--prepare_data_only", action="store_true",
                        help="build (and cache) the datasets, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.set)
    return run(config, expected_processes=args.expected_processes, prepare_data_only=args.prepare_data_only,
               argv=sys.argv if argv is None else [sys.argv[0], *argv])
