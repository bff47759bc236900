"""Medusa-1 / Medusa-2 training (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads"), registered as ``method: medusa``.

Recipe sections: ``medusa`` (version, heads, layers, shared ``lm_head``, draft vocabulary) and ``medusa2`` (LoRA
on the target, loss weights and warm-up). The objective is ``MedusaObjective``; the held-out evaluation measures
each head's rank accuracies (``hf_spec.training.evaluate``), which the exported ``config.json`` carries so the
drafter builds the paper's accuracy-derived tree. Published files::

    config.json, model.safetensors   the heads: MedusaDrafter.from_pretrained(output_dir, target=model)
    draft_vocab.safetensors, .json   with a draft vocabulary only: the N target tokens the heads score
    adapter/                         Medusa-2 only: the PEFT LoRA adapter of the target

A draft vocabulary (VocabTrim, Goel et al. 2025; FR-Spec, Zhao et al. 2025; EAGLE-3's ``d2t``, Li et al. 2025)
comes from ``medusa.draft_vocab``, a folder saved by ``python -m hf_spec.training.vocab_selection --config
<recipe> --size N --out <folder>``, or from ``medusa.draft_vocab_size: N``, which selects the ``N`` most frequent
assistant tokens of the recipe's prepared training split (plus the end-of-turn tokens) when training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...drafters.draft_vocab import WEIGHTS_NAME as VOCAB_WEIGHTS_NAME
from ...drafters.draft_vocab import DraftVocabulary
from ...drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from ..checkpoints import gathered_state_dict
from ..evaluate import evaluate_heads
from ..losses import warmup_factor
from ..models import load_target
from ..provenance import publish_adapter_base_model, published_model_name
from ..vocab_selection import recipe_draft_vocabulary
from . import MethodParts, TrainingMethod, register
from .medusa_objective import MedusaObjective

ADAPTER_DIR = "adapter"


# ---------------------------------------------------------------------------- recipe sections
@dataclass
class MedusaSection:
    version: int = 1  # 1: heads only, target frozen; 2: heads + LoRA on the target (peft)
    num_heads: int = 4
    num_layers: int = 1
    share_lm_head: bool = True
    draft_vocab: str | None = None  # folder of a saved DraftVocabulary (hf_spec.training.vocab_selection --out)
    draft_vocab_size: int | None = None  # N: select the N most frequent tokens of the prepared training data


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class Medusa2Section:
    """Medusa-2 joint training: ``L = L_LM + lambda_t * sum_k decay^k CE_k`` with ``lambda_t`` warmed up."""

    lora: LoraSection = field(default_factory=LoraSection)
    head_loss_weight: float = 0.2  # lambda
    head_loss_warmup_steps: int = 0  # lambda grows linearly from 0 over these optimizer steps
    head_lr_multiplier: float = 4.0
    lm_loss: str = "kl_to_base"  # "kl_to_base": self-distillation to the target with adapters disabled; "ce"


# ---------------------------------------------------------------------------- the method
class MedusaMethod(TrainingMethod):
    name = "medusa"
    sections = {"medusa": MedusaSection, "medusa2": Medusa2Section}
    card_template = "medusa.md"

    def validate(self, config) -> list[str]:
        problems = []
        if config.medusa.version not in (1, 2):
            problems.append(f"medusa.version must be 1 or 2, got {config.medusa.version}")
        if config.medusa2.lm_loss not in ("kl_to_base", "ce"):
            problems.append(f"medusa2.lm_loss must be 'kl_to_base' or 'ce', got {config.medusa2.lm_loss!r}")
        size = config.medusa.draft_vocab_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            problems.append(f"medusa.draft_vocab_size must be a positive integer or null, got {size!r}")
        folder = config.medusa.draft_vocab
        if folder and not (Path(folder) / VOCAB_WEIGHTS_NAME).is_file():
            problems.append(f"medusa.draft_vocab: {folder} holds no {VOCAB_WEIGHTS_NAME}; make one with python -m "
                            "hf_spec.training.vocab_selection --config <this recipe> --size N --out <folder>, or set "
                            "medusa.draft_vocab_size: N instead")
        if config.data.cache_hidden_states and config.medusa.version == 2:
            problems.append("data.cache_hidden_states needs a frozen target: it is for Medusa-1 only (Medusa-2 "
                            "recomputes the hidden states of the backbone it trains)")
        return problems

    def title(self, config) -> str:
        return f"Medusa-{config.medusa.version}"

    def batch_features(self, config) -> list:
        """Medusa-1 reads the cached last hidden state (after the final norm) when the data holds it; Medusa-2
        trains the backbone, so its hidden states are recomputed every step."""
        return ["final"] if config.medusa.version == 1 and "final" in config.data.cached_features() else []

    # ------------------------------------------------------------------ training
    def build(self, config, target) -> MethodParts:
        version = config.medusa.version
        heads = MedusaHeads.for_target(target, num_heads=config.medusa.num_heads, num_layers=config.medusa.num_layers,
                                       share_lm_head=config.medusa.share_lm_head,
                                       draft_vocab=draft_vocabulary(config, target),
                                       base_model=published_model_name(config.model.name_or_path),
                                       medusa_version=version, adapter=ADAPTER_DIR if version == 2 else None,
                                       default_num_nodes=config.eval.tree_num_nodes)
        target.requires_grad_(False)
        if version == 2:
            target = add_lora(target, config)
        objective = MedusaObjective(target, heads, version=version, labels=config.data.labels,
                                    head_loss_decay=config.training.head_loss_decay,
                                    head_loss_weight=config.medusa2.head_loss_weight, lm_loss=config.medusa2.lm_loss)
        return MethodParts(objective, parameter_groups(objective, config),
                           on_step=head_loss_warmup(config.medusa2.head_loss_warmup_steps) if version == 2 else None)

    def evaluate(self, accelerator, objective, heldout, config) -> dict:
        """Rank accuracies in target-id space (a reference token outside a draft vocabulary is a miss), plus
        the draft vocabulary's size and how it was selected, when the heads have one."""
        evaluation = evaluate_heads(accelerator, objective, heldout, top_k=config.eval.top_k,
                                    num_ranks=config.eval.num_ranks, tree_num_nodes=config.eval.tree_num_nodes)
        vocabulary = accelerator.unwrap_model(objective).heads.draft_vocab
        if vocabulary is not None:
            folder = config.medusa.draft_vocab
            source = (f"selected with hf_spec.training.vocab_selection ({Path(folder).name})" if folder
                      else "selected from the training data when training started")
            evaluation["draft_vocab"] = {**vocabulary.metadata, "size": vocabulary.size,
                                         "target_vocab_size": vocabulary.target_vocab_size, "source": source}
        return evaluation

    def input_files(self, config) -> list[Path]:
        folder = config.medusa.draft_vocab
        return [Path(folder) / VOCAB_WEIGHTS_NAME] if folder else []

    # ------------------------------------------------------------------ export
    def export_state(self, accelerator, objective, config) -> dict:
        unwrapped = accelerator.unwrap_model(objective)
        states = {"heads": gathered_state_dict(unwrapped.heads)}
        if config.medusa.version == 2:
            states["adapter"] = gathered_state_dict(unwrapped.target, only_trainable=True)
        return states

    def save(self, output_dir: Path, objective, states: dict, config, evaluation: dict) -> None:
        """Heads with their measured rank accuracies in ``config.json`` (and their draft vocabulary, if any);
        Medusa-2 also the LoRA adapter."""
        heads_config = MedusaConfig.from_dict({**objective.heads.config.to_dict(),
                                               "head_rank_accuracies": evaluation["rank_accuracies"]})
        MedusaHeads(heads_config, objective.heads.draft_vocab).save_pretrained(output_dir, state_dict=states["heads"])
        if "adapter" in states:
            adapter_dir = Path(output_dir) / ADAPTER_DIR
            objective.target.save_pretrained(adapter_dir, state_dict=states["adapter"])
            publish_adapter_base_model(adapter_dir, config.model.name_or_path)

    # ------------------------------------------------------------------ inference
    def load_drafter(self, config, output_dir: Path):
        """The target (Medusa-2: with the trained adapter merged) and a ``MedusaDrafter`` on the exported heads."""
        target, _ = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
        target.config.use_cache = True
        if config.medusa.version == 2:
            from peft import PeftModel

            target = PeftModel.from_pretrained(target, Path(output_dir) / ADAPTER_DIR).merge_and_unload()
        return target, MedusaDrafter.from_pretrained(output_dir, target=target)

    def generation_details(self, drafter) -> dict:
        return {"tree_nodes": len(drafter.rank_paths)}

    # ------------------------------------------------------------------ model card
    def card_values(self, config, summary: dict) -> dict:
        evaluation = summary["evaluation"]
        return {"heads": evaluation["heads"], "adapter_dir": ADAPTER_DIR, "draft_vocab": evaluation.get("draft_vocab")}


# ---------------------------------------------------------------------------- pieces
def draft_vocabulary(config, target) -> DraftVocabulary | None:
    """The heads' draft vocabulary from ``medusa.draft_vocab`` / ``medusa.draft_vocab_size`` (``None`` if neither)."""
    return recipe_draft_vocabulary(config, target, "medusa")


def add_lora(target, config):
    """Medusa-2: wrap the frozen target with trainable LoRA adapters (peft)."""
    from peft import LoraConfig, get_peft_model

    lora = config.medusa2.lora
    return get_peft_model(target, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def parameter_groups(objective: MedusaObjective, config) -> list[dict]:
    """Heads at ``lr`` (Medusa-1) or ``lr * head_lr_multiplier`` (Medusa-2); LoRA adapters at ``lr``."""
    lr = config.training.learning_rate
    head_lr = lr * (config.medusa2.head_lr_multiplier if config.medusa.version == 2 else 1.0)
    groups = [{"params": [p for p in objective.heads.parameters() if p.requires_grad], "lr": head_lr}]
    adapters = [p for p in objective.target.parameters() if p.requires_grad]
    if adapters:
        groups.append({"params": adapters, "lr": lr})
    return groups


def head_loss_warmup(steps: int):
    """Medusa-2's head-loss warm-up: ``lambda_t`` grows linearly to its full value over ``steps`` optimizer steps."""
    def set_scale(objective, step):
        objective.head_loss_scale = warmup_factor(step + 1, steps)

    return set_scale


register(MedusaMethod())
