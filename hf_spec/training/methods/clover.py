"""Clover-2 training (Xiao et al. 2024, "Clover-2: Accurate Inference for Regressive Lightweight Speculative
Decoding"), registered as ``method: clover``.

Recipe section ``clover``: the number of chained heads, the per-head decay, the weight of the feature-regression
loss, the draft vocabulary and the default tree. The target is frozen; its last pre-norm hidden state and its
post-norm one (for its own distributions) come from the prepared feature cache when ``clover.feature_layer``
names the former and ``data.feature_layers`` holds both, and are computed on the fly otherwise. The objective is
``CloverObjective``. Published files::

    config.json, model.safetensors   the heads: CloverDrafter.from_pretrained(output_dir, target=model)
    draft_vocab.safetensors, .json   with a draft vocabulary: the N target tokens the heads score
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...drafters.clover import CloverConfig, CloverDrafter, CloverHeads
from ...drafters.draft_vocab import WEIGHTS_NAME as VOCAB_WEIGHTS_NAME
from ...engine.features import FINAL
from ..checkpoints import gathered_state_dict
from ..models import load_target
from ..provenance import published_model_name
from ..vocab_selection import recipe_draft_vocabulary
from . import MethodParts, TrainingMethod, register
from .clover_objective import CloverObjective
from .step_predictions import evaluate_steps


@dataclass
class CloverSection:
    num_heads: int = 5
    head_loss_decay: float = 0.7  # head i weighted decay ** i
    feature_loss_weight: float = 10.0  # SmoothL1 to the target's next feature, next to the soft cross-entropy
    feature_layer: int | None = None  # the target's layer count n (its last pre-norm state): named, the cache is used
    draft_vocab: str | None = None  # folder of a saved DraftVocabulary (hf_spec.training.vocab_selection --out)
    draft_vocab_size: int | None = None  # N: the N most frequent tokens of the prepared training data
    tree_top_k: int = 4  # the published heads' default dynamic tree (its depth is num_heads)
    tree_budget: int = 16


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


class CloverMethod(TrainingMethod):
    name = "clover"
    sections = {"clover": CloverSection}
    card_template = "clover.md"

    def title(self, config) -> str:
        return "Clover-2"

    def validate(self, config) -> list[str]:
        section = config.clover
        problems = [f"clover.{name} must be a positive integer, got {getattr(section, name)!r}"
                    for name in ("num_heads", "tree_top_k", "tree_budget") if not _positive_int(getattr(section, name))]
        if section.feature_layer is not None and not _positive_int(section.feature_layer):
            problems.append("clover.feature_layer must be null or the target's layer count, "
                            f"got {section.feature_layer!r}")
        if section.draft_vocab_size is not None and not _positive_int(section.draft_vocab_size):
            problems.append("clover.draft_vocab_size must be a positive integer or null, "
                            f"got {section.draft_vocab_size!r}")
        if section.draft_vocab and not (Path(section.draft_vocab) / VOCAB_WEIGHTS_NAME).is_file():
            problems.append(f"clover.draft_vocab: {section.draft_vocab} holds no {VOCAB_WEIGHTS_NAME}; make one with "
                            "python -m hf_spec.training.vocab_selection --config <this recipe> --size N --out <folder>")
        return problems

    def batch_features(self, config) -> list:
        layer = config.clover.feature_layer
        cached = set(map(str, config.data.cached_features()))
        return [layer, FINAL] if layer is not None and {str(layer), FINAL} <= cached else []

    def input_files(self, config) -> list[Path]:
        folder = config.clover.draft_vocab
        return [Path(folder) / VOCAB_WEIGHTS_NAME] if folder else []

    # ------------------------------------------------------------------ training
    def build(self, config, target) -> MethodParts:
        section = config.clover
        layers = target.config.get_text_config().num_hidden_layers
        if section.feature_layer is not None and section.feature_layer != layers:
            raise ValueError(f"clover.feature_layer is {section.feature_layer}, but Clover-2 reads the last layer of "
                             f"this {layers}-layer target: set it to {layers} (or null).")
        heads = CloverHeads.for_target(target, num_heads=section.num_heads,
                                       draft_vocab=recipe_draft_vocabulary(config, target, "clover"),
                                       base_model=published_model_name(config.model.name_or_path),
                                       tree_top_k=section.tree_top_k, tree_budget=section.tree_budget)
        target.requires_grad_(False)
        objective = CloverObjective(target, heads, decay=section.head_loss_decay,
                                    feature_loss_weight=section.feature_loss_weight)
        return MethodParts(objective, [{"params": list(heads.parameters()), "lr": config.training.learning_rate}])

    def evaluate(self, accelerator, objective, heldout, config) -> dict:
        return evaluate_steps(accelerator, objective, heldout)

    # ------------------------------------------------------------------ export
    def export_state(self, accelerator, objective, config) -> dict:
        return {"heads": gathered_state_dict(accelerator.unwrap_model(objective).draft)}

    def save(self, output_dir: Path, objective, states: dict, config, evaluation: dict) -> None:
        """The heads with their measured per-head top-1 in ``config.json`` (and their draft vocabulary)."""
        heads = objective.draft
        heads_config = CloverConfig.from_dict({**heads.config.to_dict(), "head_top1": evaluation["step_top1"]})
        CloverHeads(heads_config, heads.draft_vocab).save_pretrained(output_dir, state_dict=states["heads"])

    # ------------------------------------------------------------------ inference
    def load_drafter(self, config, output_dir: Path):
        target, _ = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
        target.config.use_cache = True
        return target, CloverDrafter.from_pretrained(output_dir, target=target)

    def generation_details(self, drafter) -> dict:
        spec = drafter.default_tree_spec
        return {"tree_nodes": spec.budget, "tree_depth": spec.depth}

    # ------------------------------------------------------------------ model card
    def card_tags(self, config) -> list[str]:
        return ["speculative-decoding", "clover", "hf_spec"]

    def card_values(self, config, summary: dict) -> dict:
        evaluation = summary["evaluation"]
        return {"steps": evaluation["steps"], "draft_vocab": evaluation.get("draft_vocab")}


register(CloverMethod())
