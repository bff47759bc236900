"""Falcon training (Gao et al. 2024, "Falcon: Faster and Parallel Inference of Large Language Models through
Enhanced Semi-Autoregressive Drafting and Custom-Designed Decoding Tree"), registered as ``method: falcon``.

Recipe section ``falcon``: the block size ``k``, the passes unrolled in training and drafted at inference, the loss
weights, the glancing schedule (Coupled Sequential Glancing Distillation), the draft vocabulary and the default
tree. The target is frozen; its post-norm last hidden state comes from the prepared feature cache when
``data.feature_layers`` holds ``final``, and is computed on the fly otherwise. The objective is
``FalconObjective``. Published files::

    config.json, model.safetensors   the drafter: FalconDrafter.from_pretrained(output_dir, target=model)
    draft_vocab.safetensors, .json   with a draft vocabulary: the N target tokens it scores
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...drafters.draft_vocab import WEIGHTS_NAME as VOCAB_WEIGHTS_NAME
from ...drafters.falcon import FalconConfig, FalconDraft, FalconDrafter
from ...engine.features import FINAL
from ..checkpoints import gathered_state_dict
from ..models import load_target
from ..provenance import published_model_name
from ..vocab_selection import recipe_draft_vocabulary
from . import MethodParts, TrainingMethod, register
from .falcon_objective import FalconObjective
from .step_predictions import evaluate_steps


@dataclass
class FalconSection:
    block_size: int = 2  # k: tokens per drafter pass (the paper's)
    train_passes: int = 2  # passes unrolled in training (pass n >= 1 reads the drafter's own features)
    num_passes: int = 3  # passes the published drafter's default tree uses (depth k * num_passes)
    pass_loss_decay: float = 0.8  # pass n weighted decay ** n
    feature_loss_weight: float = 1.0  # SmoothL1 to the target's feature (the paper's 1)
    token_loss_weight: float = 0.1  # soft cross-entropy to the target's distribution (the paper's 0.1)
    glance_start: float = 0.45  # glancing ratio at the first step, annealed linearly ...
    glance_end: float = 0.1  # ... to this one
    glance_anneal_steps: int = 250  # ... over this many optimizer steps (about one epoch of the SmolLM2 data)
    draft_vocab: str | None = None  # folder of a saved DraftVocabulary (hf_spec.training.vocab_selection --out)
    draft_vocab_size: int | None = None  # N: the N most frequent tokens of the prepared training data
    tree_top_k: int = 4
    tree_budget: int = 16


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def glance_schedule(start: float, end: float, steps: int):
    """``on_step`` hook: the objective's glancing ratio, linear from ``start`` to ``end`` over ``steps``."""

    def on_step(objective, step: int) -> None:
        objective.glance_ratio = start + (end - start) * min(1.0, step / max(steps, 1))

    return on_step


class FalconMethod(TrainingMethod):
    name = "falcon"
    sections = {"falcon": FalconSection}
    card_template = "falcon.md"

    def title(self, config) -> str:
        return "Falcon"

    def validate(self, config) -> list[str]:
        section = config.falcon
        problems = [f"falcon.{name} must be a positive integer, got {getattr(section, name)!r}"
                    for name in ("block_size", "train_passes", "num_passes", "glance_anneal_steps", "tree_top_k",
                                 "tree_budget") if not _positive_int(getattr(section, name))]
        for name in ("glance_start", "glance_end"):
            if not 0.0 <= getattr(section, name) <= 1.0:
                problems.append(f"falcon.{name} is a fraction of the mistakes, in [0, 1], got {getattr(section, name)}")
        if section.draft_vocab_size is not None and not _positive_int(section.draft_vocab_size):
            problems.append("falcon.draft_vocab_size must be a positive integer or null, "
                            f"got {section.draft_vocab_size!r}")
        if section.draft_vocab and not (Path(section.draft_vocab) / VOCAB_WEIGHTS_NAME).is_file():
            problems.append(f"falcon.draft_vocab: {section.draft_vocab} holds no {VOCAB_WEIGHTS_NAME}; make one with "
                            "python -m hf_spec.training.vocab_selection --config <this recipe> --size N --out <folder>")
        return problems

    def batch_features(self, config) -> list:
        return [FINAL] if FINAL in set(map(str, config.data.cached_features())) else []

    def input_files(self, config) -> list[Path]:
        folder = config.falcon.draft_vocab
        return [Path(folder) / VOCAB_WEIGHTS_NAME] if folder else []

    # ------------------------------------------------------------------ training
    def build(self, config, target) -> MethodParts:
        section = config.falcon
        draft = FalconDraft.for_target(target, block_size=section.block_size, num_passes=section.num_passes,
                                       draft_vocab=recipe_draft_vocabulary(config, target, "falcon"),
                                       base_model=published_model_name(config.model.name_or_path),
                                       tree_top_k=section.tree_top_k, tree_budget=section.tree_budget)
        target.requires_grad_(False)
        draft.lm_head.requires_grad_(False)  # the target's head, frozen as in the paper
        objective = FalconObjective(target, draft, passes=section.train_passes, pass_decay=section.pass_loss_decay,
                                    feature_loss_weight=section.feature_loss_weight,
                                    token_loss_weight=section.token_loss_weight, glance_ratio=section.glance_start)
        return MethodParts(objective, [{"params": draft.trainable_parameters(), "lr": config.training.learning_rate}],
                           on_step=glance_schedule(section.glance_start, section.glance_end,
                                                   section.glance_anneal_steps))

    def evaluate(self, accelerator, objective, heldout, config) -> dict:
        return evaluate_steps(accelerator, objective, heldout)

    # ------------------------------------------------------------------ export
    def export_state(self, accelerator, objective, config) -> dict:
        return {"draft": gathered_state_dict(accelerator.unwrap_model(objective).draft)}

    def save(self, output_dir: Path, objective, states: dict, config, evaluation: dict) -> None:
        """The drafter with its measured per-depth top-1 in ``config.json`` (and its draft vocabulary)."""
        draft = objective.draft
        draft_config = FalconConfig.from_dict({**draft.config.to_dict(), "step_top1": evaluation["step_top1"]})
        FalconDraft(draft_config, draft.draft_vocab).save_pretrained(output_dir, state_dict=states["draft"])

    # ------------------------------------------------------------------ inference
    def load_drafter(self, config, output_dir: Path):
        target, _ = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
        target.config.use_cache = True
        return target, FalconDrafter.from_pretrained(output_dir, target=target)

    def generation_details(self, drafter) -> dict:
        spec = drafter.default_tree_spec
        return {"tree_nodes": spec.budget, "tree_depth": spec.depth}

    # ------------------------------------------------------------------ model card
    def card_tags(self, config) -> list[str]:
        return ["speculative-decoding", "falcon", "hf_spec"]

    def card_values(self, config, summary: dict) -> dict:
        evaluation = summary["evaluation"]
        return {"steps": evaluation["steps"], "draft_vocab": evaluation.get("draft_vocab")}


register(FalconMethod())
