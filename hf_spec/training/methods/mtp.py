"""Gated-LoRA multi-token prediction training (Samragh et al. 2025, "Your LLM Knows the Future: Uncovering Its
Multi-Token Prediction Potential"), registered as ``method: mtp``.

Recipe section ``mtp``: the number of mask tokens ``k``, the gated LoRA (rank, alpha, target modules), the sampler
head, how many anchors (mask blocks) each sequence gets per step, the loss weights and the held-out evaluation's
size. The base model is frozen and wrapped in place by ``MTPModel`` (``hf_spec.drafters.mtp``): its LoRA is gated to
the mask rows, so its next-token outputs stay exactly the base model's. It runs on every step (the mask rows attend
to the ordinary rows' keys and values at every layer), so no cached feature is read. The objective is
``MTPObjective`` (``mtp_objective.py``). Published files::

    config.json, model.safetensors   the adapter (mask embeddings, sampler, LoRA A/B; never the base model):
                                     MTPDrafter.from_pretrained(output_dir, target=model) (decoding) or
                                     MTPModel.from_pretrained(output_dir, base=model)

``eval.generate_prompts`` decodes held-out prompts with ``MTPDrafter`` on a fresh base model after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...drafters.mtp import DEFAULT_TARGET_MODULES, MTPDrafter, MTPModel
from ..checkpoints import gathered_state_dict
from ..models import load_target
from ..provenance import published_model_name
from . import MethodParts, TrainingMethod, register
from .mtp_objective import MTPObjective, evaluate_slots

ADAPTER_PART = "adapter"


@dataclass
class MTPSection:
    num_mask_tokens: int = 4  # k: future tokens drafted beyond the base model's next one
    lora_rank: int = 16
    lora_alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    sampler_hidden_size: int | None = None  # the sampler MLP's width (null: the base's hidden size)
    sampler_residual: bool = True  # sampler output added to the mask latent (a fresh sampler = the base head)
    anchors_per_sequence: int | None = 16  # A: random reply positions per sequence and step (null: every one)
    max_length: int | None = None  # tokens of each sequence used (a causal prefix; null: all)
    sampler_loss_weight: float = 1.0
    mask_loss_weight: float = 1.0  # the base lm_head on the mask latents (the paper's mask-token prediction)
    consistency_loss_weight: float = 1.0  # latent consistency (MSE to the detached ordinary hidden state, relative)
    slot_loss_decay: float = 1.0  # slot j weighted decay ** j
    eval_anchors_per_sequence: int | None = 32  # held-out anchors per sequence (hash-seeded; null: every one)
    eval_max_sequences: int | None = None  # held-out sequences evaluated (null: all)


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


class MTPMethod(TrainingMethod):
    name = "mtp"
    sections = {"mtp": MTPSection}
    card_template = "mtp.md"

    def title(self, config) -> str:
        return "Gated-LoRA MTP"

    def validate(self, config) -> list[str]:
        section = config.mtp
        problems = []
        for name in ("num_mask_tokens", "lora_rank"):
            if not _positive_int(getattr(section, name)):
                problems.append(f"mtp.{name} must be a positive integer, got {getattr(section, name)!r}")
        for name in ("sampler_hidden_size", "anchors_per_sequence", "eval_anchors_per_sequence", "eval_max_sequences"):
            value = getattr(section, name)
            if value is not None and not _positive_int(value):
                problems.append(f"mtp.{name} must be a positive integer or null, got {value!r}")
        if section.max_length is not None and (not _positive_int(section.max_length) or section.max_length < 3):
            problems.append(f"mtp.max_length must be null or an integer >= 3 (an anchor, its next token and one "
                            f"label), got {section.max_length!r}")
        if not section.target_modules or not all(isinstance(name, str) and name for name in section.target_modules):
            problems.append(f"mtp.target_modules must name decoder linears, got {section.target_modules!r}")
        for name in ("lora_alpha", "sampler_loss_weight", "mask_loss_weight", "consistency_loss_weight",
                     "slot_loss_decay"):
            value = getattr(section, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"mtp.{name} must be a number >= 0, got {value!r}")
        if not any(getattr(section, name) for name in ("sampler_loss_weight", "mask_loss_weight")):
            problems.append("mtp.sampler_loss_weight and mtp.mask_loss_weight are both 0: nothing trains the drafts")
        if config.model.attn_implementation and "flash" in str(config.model.attn_implementation):
            problems.append("model.attn_implementation: the MTP training layout needs a 4D attention mask, which "
                            "flash attention cannot take; use sdpa or eager")
        return problems

    # ------------------------------------------------------------------ training
    def build(self, config, target) -> MethodParts:
        section = config.mtp
        target.requires_grad_(False)
        mtp = MTPModel.for_base(target, num_mask_tokens=section.num_mask_tokens, lora_rank=section.lora_rank,
                                lora_alpha=section.lora_alpha, target_modules=list(section.target_modules),
                                sampler_hidden_size=section.sampler_hidden_size,
                                sampler_residual=section.sampler_residual,
                                base_model=published_model_name(config.model.name_or_path))
        objective = MTPObjective(mtp, anchors_per_sequence=section.anchors_per_sequence, max_length=section.max_length,
                                 sampler_weight=section.sampler_loss_weight, mask_weight=section.mask_loss_weight,
                                 consistency_weight=section.consistency_loss_weight,
                                 slot_decay=section.slot_loss_decay, labels=config.data.labels,
                                 eval_anchors_per_sequence=section.eval_anchors_per_sequence,
                                 seed=config.training.seed)
        return MethodParts(objective, [{"params": mtp.trainable_parameters(), "lr": config.training.learning_rate}])

    def evaluate(self, accelerator, objective, heldout, config) -> dict:
        sequences = config.mtp.eval_max_sequences
        per_batch = config.training.micro_batch_size * accelerator.num_processes
        max_batches = None if sequences is None else max(1, -(-sequences // per_batch))
        return evaluate_slots(accelerator, objective, heldout, max_batches=max_batches)

    # ------------------------------------------------------------------ export
    def export_state(self, accelerator, objective, config) -> dict:
        return {ADAPTER_PART: gathered_state_dict(accelerator.unwrap_model(objective).mtp, only_trainable=True)}

    def save(self, output_dir: Path, objective, states: dict, config, evaluation: dict) -> None:
        objective.mtp.save_pretrained(output_dir, state_dict=states[ADAPTER_PART])

    # ------------------------------------------------------------------ inference
    def load_drafter(self, config, output_dir: Path):
        """A fresh base model with the exported adapter loaded onto it, and the ``MTPDrafter`` that decodes with it."""
        target, _ = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
        target.config.use_cache = True
        drafter = MTPDrafter.from_pretrained(output_dir, target)
        return target, drafter

    # ------------------------------------------------------------------ model card
    def card_tags(self, config) -> list[str]:
        return ["speculative-decoding", "mtp", "multi-token-prediction", "gated-lora", "hf_spec"]

    def card_values(self, config, summary: dict) -> dict:
        evaluation = summary["evaluation"]
        return {"slots": evaluation["slots"], "labels": config.data.labels}


register(MTPMethod())
