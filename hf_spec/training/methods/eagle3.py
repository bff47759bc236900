"""EAGLE-3 training (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via
Training-Time Test"), registered as ``method: eagle3``.

Recipe section ``eagle3``: the fused target layers, the training-time-test depth and decay, the draft vocabulary
and the default decoding tree. The target is frozen; its features come from the prepared feature cache when
``data.feature_layers`` holds the draft's layers and ``"final"`` (the post-norm state, for the target's own
distributions), and are computed on the fly otherwise. The objective is ``Eagle3Objective``. Published files::

    config.json, model.safetensors   the draft layer: Eagle3Drafter.from_pretrained(output_dir, target=model)
    draft_vocab.safetensors, .json   with a draft vocabulary: the N target tokens the draft scores
    speculators/                     the same draft in the speculators format vLLM serves (speculators_format.py;
                                     not written for a soft-capped target, which that format cannot express)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...drafters.draft_vocab import WEIGHTS_NAME as VOCAB_WEIGHTS_NAME
from ...drafters.eagle3 import Eagle3Config, Eagle3Draft, Eagle3Drafter
from ...drafters.eagle3.speculators_format import export_speculators
from ...engine.features import FINAL
from ..checkpoints import gathered_state_dict
from ..models import load_target
from ..provenance import published_model_name
from ..vocab_selection import recipe_draft_vocabulary
from . import MethodParts, TrainingMethod, register
from .eagle3_objective import Eagle3Objective
from .step_predictions import evaluate_steps

SPECULATORS_DIR = "speculators"


@dataclass
class Eagle3Section:
    feature_layers: list[int] | None = None  # output_hidden_states indices; None: EAGLE-3's (2, n // 2, n - 3)
    ttt_steps: int = 3  # drafting steps unrolled in training (training-time test; the paper uses 7)
    step_loss_decay: float = 0.8  # step j weighted decay ** j
    draft_vocab: str | None = None  # folder of a saved DraftVocabulary (hf_spec.training.vocab_selection --out)
    draft_vocab_size: int | None = None  # N: the N most frequent tokens of the prepared training data
    tree_depth: int = 5  # the published draft's default EAGLE-2 dynamic tree
    tree_top_k: int = 4
    tree_budget: int = 16


class Eagle3Method(TrainingMethod):
    name = "eagle3"
    sections = {"eagle3": Eagle3Section}
    card_template = "eagle3.md"

    def title(self, config) -> str:
        return "EAGLE-3"

    def validate(self, config) -> list[str]:
        section = config.eagle3
        problems = []
        if isinstance(section.ttt_steps, bool) or not isinstance(section.ttt_steps, int) or section.ttt_steps < 1:
            problems.append(f"eagle3.ttt_steps must be a positive integer, got {section.ttt_steps!r}")
        layers = section.feature_layers
        if layers is not None and (not layers or any(
                isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 for layer in layers)):
            problems.append("eagle3.feature_layers must be null or a list of output_hidden_states indices (ints >= 0), "
                            f"got {section.feature_layers!r}")
        elif layers is not None and len(set(layers)) != len(layers):
            problems.append(f"eagle3.feature_layers names a layer twice: {layers!r}")
        size = section.draft_vocab_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            problems.append(f"eagle3.draft_vocab_size must be a positive integer or null, got {size!r}")
        if section.draft_vocab and not (Path(section.draft_vocab) / VOCAB_WEIGHTS_NAME).is_file():
            problems.append(f"eagle3.draft_vocab: {section.draft_vocab} holds no {VOCAB_WEIGHTS_NAME}; make one with "
                            "python -m hf_spec.training.vocab_selection --config <this recipe> --size N --out <folder>")
        for name in ("tree_depth", "tree_top_k", "tree_budget"):
            value = getattr(section, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"eagle3.{name} must be a positive integer, got {value!r}")
        return problems

    def batch_features(self, config) -> list:
        """The draft's layers and the post-norm state, when the prepared data caches them all (the layers must be
        named in ``eagle3.feature_layers`` to be looked up before the target is loaded)."""
        layers = config.eagle3.feature_layers
        cached = set(map(str, config.data.cached_features()))
        wanted = [*(layers or []), FINAL]
        return wanted if layers and all(str(layer) in cached for layer in wanted) else []

    def input_files(self, config) -> list[Path]:
        folder = config.eagle3.draft_vocab
        return [Path(folder) / VOCAB_WEIGHTS_NAME] if folder else []

    # ------------------------------------------------------------------ training
    def build(self, config, target) -> MethodParts:
        section = config.eagle3
        draft = Eagle3Draft.for_target(target, feature_layers=section.feature_layers,
                                       draft_vocab=recipe_draft_vocabulary(config, target, "eagle3"),
                                       base_model=published_model_name(config.model.name_or_path),
                                       tree_depth=section.tree_depth, tree_top_k=section.tree_top_k,
                                       tree_budget=section.tree_budget)
        target.requires_grad_(False)
        objective = Eagle3Objective(target, draft, steps=section.ttt_steps, step_decay=section.step_loss_decay)
        return MethodParts(objective, [{"params": list(draft.parameters()), "lr": config.training.learning_rate}])

    def evaluate(self, accelerator, objective, heldout, config) -> dict:
        return evaluate_steps(accelerator, objective, heldout)

    # ------------------------------------------------------------------ export
    def export_state(self, accelerator, objective, config) -> dict:
        return {"draft": gathered_state_dict(accelerator.unwrap_model(objective).draft)}

    def save(self, output_dir: Path, objective, states: dict, config, evaluation: dict) -> None:
        """The draft layer with its measured per-step top-1 in ``config.json`` (and its draft vocabulary)."""
        draft = objective.draft
        draft_config = Eagle3Config.from_dict({**draft.config.to_dict(), "step_top1": evaluation["step_top1"]})
        saved = Eagle3Draft(draft_config, draft.draft_vocab)
        saved.save_pretrained(output_dir, state_dict=states["draft"])
        if draft_config.logit_softcapping is None:
            saved.load_state_dict(states["draft"])
            text = objective.target.config.get_text_config()
            export_speculators(saved, Path(output_dir) / SPECULATORS_DIR,
                               verifier_name_or_path=published_model_name(config.model.name_or_path),
                               verifier_architectures=list(getattr(objective.target.config, "architectures", None)
                                                           or [type(objective.target).__name__]),
                               max_position_embeddings=getattr(text, "max_position_embeddings", None))

    # ------------------------------------------------------------------ inference
    def load_drafter(self, config, output_dir: Path):
        target, _ = load_target(config.model.name_or_path, config.model.dtype, config.model.attn_implementation)
        target.config.use_cache = True
        return target, Eagle3Drafter.from_pretrained(output_dir, target=target)

    def generation_details(self, drafter) -> dict:
        spec = drafter.default_tree_spec
        return {"tree_nodes": spec.budget, "tree_depth": spec.depth}

    # ------------------------------------------------------------------ model card
    def card_tags(self, config) -> list[str]:
        return ["speculative-decoding", "eagle3", "eagle", "hf_spec"]

    def card_values(self, config, summary: dict) -> dict:
        evaluation = summary["evaluation"]
        return {"steps": evaluation["steps"], "draft_vocab": evaluation.get("draft_vocab"),
                "eagle3_layers": evaluation["feature_layers"]}


register(Eagle3Method())
