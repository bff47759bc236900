"""Recipe configuration: one YAML file per (method, model), strict about unknown keys.

Every recipe has the sections ``model``, ``data``, ``training``, ``eval`` and ``hub`` (this module) and
names its ``method``; the method adds its own sections (``hf_spec.training.methods``; Medusa adds
``medusa`` and ``medusa2``). Every section is a dataclass, so a typo in a YAML key or a
``--set section.key=value`` override is an error naming the valid keys instead of a silently ignored
setting.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data_config import DataSection, data_section_problems


@dataclass
class ModelSection:
    """The target. ``name_or_path``: a local folder, a Hub id, or ``hf_spec:<name>`` (``hf_spec:tiny-random-llama``
    for tests, ``hf_spec:smollm2-135m-instruct`` etc. for the offline models of ``hf_spec.offline_models``)."""

    name_or_path: str = ""
    dtype: str = "float32"  # weights of the frozen target; bf16 autocast comes from training.mixed_precision
    attn_implementation: str | None = None


@dataclass
class TrainingSection:
    output_dir: str = "outputs/train"
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    lr_scheduler: str = "cosine"  # any transformers.get_scheduler name
    warmup_steps: int = 0
    max_grad_norm: float = 0.5
    head_loss_decay: float = 0.8  # head k's loss weight is decay**k (1.0: unweighted sum)
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA that supports it, else no), "no", "bf16", "fp16"
    save_every_steps: int | None = None
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto": latest checkpoint in output_dir if any; "none"; or a checkpoint folder
    log_every_steps: int = 10
    report_to: list[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]
    seed: int = 0
    num_threads: int | None = None  # torch CPU threads per process


@dataclass
class EvalSection:
    top_k: int = 5
    num_ranks: int = 10  # rank accuracies kept per head (for a tree drafter's default tree)
    tree_num_nodes: int = 32
    generate_prompts: int = 0  # held-out prompts decoded with the trained drafter to measure tau and speed
    generate_max_new_tokens: int = 128


@dataclass
class HubSection:
    push: bool = False
    repo_id: str | None = None
    private: bool | None = None
    license: str | None = None


@dataclass
class RecipeConfig:
    """The sections every method shares; ``recipe_config_class(method)`` adds the method's own sections."""

    method: str = ""  # a registered training method (hf_spec.training.methods), e.g. "medusa"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    hub: HubSection = field(default_factory=HubSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def method_sections(self) -> dict[str, Any]:
        """The sections the method added (e.g. ``{"medusa": MedusaSection(...), "medusa2": ...}``)."""
        shared = {spec.name for spec in dataclasses.fields(RecipeConfig)}
        return {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self) if spec.name not in shared}


@functools.cache
def recipe_config_class(method) -> type[RecipeConfig]:
    """``RecipeConfig`` plus one field per section ``method`` registers (``method.sections``)."""
    extra = [(name, section, field(default_factory=section)) for name, section in method.sections.items()]
    title = "".join(part.capitalize() for part in method.name.replace("-", "_").split("_"))
    return dataclasses.make_dataclass(f"{title}RecipeConfig", extra, bases=(RecipeConfig,))


class ConfigError(ValueError):
    """A recipe configuration key or value is invalid."""


def build_section(cls, values: dict | None, where: str):
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {where}; valid keys: {sorted(known)}.")
    kwargs = {}
    for name, value in values.items():
        spec = known[name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_section(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"Override {assignment!r} must look like section.key=value.")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {assignment!r}: {key} is not a section.")
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None, method: str | None = None) -> RecipeConfig:
    """Read a recipe YAML and apply ``--set`` overrides; unknown keys raise ``ConfigError``.

    The method is the YAML's ``method:`` key, else ``method`` (an entry point for one method, e.g.
    ``recipes/train_medusa.py``), else the one registered method whose sections the YAML has.
    """
    from .methods import get_method

    tree: dict[str, Any] = {}
    if path is not None:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    chosen = get_method(choose_method(tree, method))
    config = build_section(recipe_config_class(chosen), {**tree, "method": chosen.name}, "the recipe config")
    validate(config, chosen)
    return config


def choose_method(tree: dict, entry_point_method: str | None) -> str:
    """The method a recipe tree asks for (see ``load_config``)."""
    from .methods import method_names, method_sections

    named = tree.get("method")
    if named and entry_point_method and named != entry_point_method:
        raise ConfigError(f"This recipe trains method {named!r}, but this entry point trains {entry_point_method!r}: "
                          "launch recipes/train.py (any method) instead.")
    if named or entry_point_method:
        return named or entry_point_method
    present = [name for name in method_names() if set(method_sections(name)) & set(tree)]
    if len(present) != 1:
        raise ConfigError(f"Say which method the recipe trains: add `method: <name>` to it (registered methods: "
                          f"{method_names()}){'; its sections fit ' + str(present) if present else ''}.")
    return present[0]


def validate(config: RecipeConfig, method) -> None:
    """Raise ``ConfigError`` listing every problem of the shared sections and of ``method``'s (``method.validate``)."""
    problems = []
    if not config.model.name_or_path:
        problems.append("model.name_or_path is required")
    problems += data_section_problems(config.data)
    if config.training.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        problems.append("training.mixed_precision must be auto, no, bf16 or fp16")
    if config.hub.push and not config.hub.repo_id:
        problems.append("hub.push needs hub.repo_id")
    problems += method.validate(config)
    if problems:
        raise ConfigError("Invalid recipe config: " + "; ".join(problems) + ".")
