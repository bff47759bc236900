"""Training methods: everything the generic core asks of one draft method, and the registry that finds them.

The core (``recipe.py``: data, launch, export, card, Hub; ``loop.py``: the training loop; ``checkpoints.py``)
knows nothing about any method. A method is one module in this package that subclasses ``TrainingMethod``
and calls ``register`` on an instance; ``get_method(name)`` imports ``hf_spec.training.methods.<name>`` on
first use, so adding a method touches no existing file. The core calls, in this order:

1. ``sections`` (class attribute): the recipe sections it adds, e.g. Medusa's ``medusa`` and ``medusa2``;
   ``validate(config)`` returns the problems of those settings.
2. ``batch_features(config)``: which cached target features its batches carry (``data.feature_layers``);
   ``build(config, target)``: the drafter modules and the objective (an ``nn.Module`` whose
   ``forward(**batch)`` returns a dict with a scalar ``loss``; every other tensor is logged), its optimizer
   parameter groups, and an optional ``on_step`` hook run before each optimizer step.
3. ``evaluate(accelerator, objective, heldout, config)``: held-out numbers for ``eval.json`` and the card.
4. ``export_state(accelerator, objective, config)`` on every rank (collective: ZeRO-3 shards are gathered),
   then ``save(output_dir, objective, states, config, evaluation)`` on the main process: the published files.
5. ``load_drafter(config, output_dir)``: target and drafter rebuilt from those files, to decode held-out
   prompts (``eval.generate_prompts``).
6. ``title``, ``card_template`` (a file in ``hf_spec/training/cards/``), ``card_tags`` and ``card_values``:
   the model card.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import ConfigError, RecipeConfig

_REGISTRY: dict[str, TrainingMethod] = {}


@dataclass
class MethodParts:
    """What ``TrainingMethod.build`` hands the training loop."""

    objective: torch.nn.Module  # forward(**batch) -> {"loss": scalar, ...logged tensors}
    parameter_groups: list[dict]  # torch optimizer parameter groups (each with its own "lr")
    on_step: Callable[[torch.nn.Module, int], None] | None = None  # (unwrapped objective, step) before each step


class TrainingMethod(ABC):
    """One draft method's training: config sections, objective, evaluation, export, drafter, model card."""

    name: ClassVar[str]  # the recipe's ``method:`` value, and configs/<name>/
    sections: ClassVar[dict[str, type]]  # recipe sections this method adds (dataclasses), by YAML key
    card_template: ClassVar[str]  # model-card template: a file name in hf_spec/training/cards/, or an absolute path

    def validate(self, config) -> list[str]:
        """Problems with this method's settings (empty when valid)."""
        return []

    def title(self, config) -> str:
        """The method's name as the card and ``eval.json`` show it (e.g. ``"Medusa-2"``)."""
        return self.name

    @abstractmethod
    def build(self, config, target) -> MethodParts:
        """Drafter modules and objective for ``target`` (loaded, on the training device)."""

    @abstractmethod
    def evaluate(self, accelerator, objective, heldout, config) -> dict:
        """Held-out evaluation; ``heldout`` is a prepared (sharded) DataLoader, ``objective`` the prepared one."""

    @abstractmethod
    def export_state(self, accelerator, objective, config) -> dict[str, dict[str, torch.Tensor]]:
        """Full CPU tensors to publish, by part (e.g. ``{"heads": ..., "adapter": ...}``), on every rank."""

    @abstractmethod
    def save(self, output_dir: Path, objective, states: dict[str, dict[str, torch.Tensor]], config,
             evaluation: dict) -> None:
        """Write the published files of ``states`` into ``output_dir`` (main process only)."""

    @abstractmethod
    def load_drafter(self, config, output_dir: Path) -> tuple[Any, Any]:
        """``(target, drafter)`` from ``output_dir`` for decoding (the target as the drafter expects it)."""

    def batch_features(self, config) -> list:
        """Cached target features (names from ``data.feature_layers``: ``"final"`` or a layer index) that the
        objective's ``forward`` takes, as ``hidden`` (``"final"``) or ``hidden_<i>``; none by default."""
        return []

    def input_files(self, config) -> list[Path]:
        """Files named by the method's sections whose contents shape the trained weights (a resumed run checks
        their hashes, not only their paths); none by default."""
        return []

    def generation_details(self, drafter) -> dict:
        """Extra facts about the drafter used in the decoding check (e.g. its tree size)."""
        return {}

    def card_tags(self, config) -> list[str]:
        return ["speculative-decoding", self.name, "hf_spec"]

    def card_values(self, config, summary: dict) -> dict:
        """Values the card template reads besides the shared ones and the method's sections (``recipe.model_card``)."""
        return {}


def register(method: TrainingMethod) -> TrainingMethod:
    """Make ``method`` available as ``method: <method.name>`` in recipes."""
    if not isinstance(method, TrainingMethod):
        raise TypeError(f"register() takes a TrainingMethod instance, got {type(method).__name__}.")
    shared = {spec.name for spec in dataclasses.fields(RecipeConfig)}
    clashes = sorted(set(method.sections) & shared)
    if clashes:
        raise ValueError(f"Method {method.name!r} registers section(s) {clashes}, which every recipe already has; "
                         "name its sections after the method.")
    existing = _REGISTRY.get(method.name)
    if existing is not None and type(existing) is not type(method):
        raise ValueError(f"Training method {method.name!r} is already registered by {type(existing).__name__}.")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> TrainingMethod:
    """The registered method ``name``, importing ``hf_spec.training.methods.<name>`` first if needed."""
    if name not in _REGISTRY and name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        importlib.import_module(f"{__name__}.{name}")
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown training method {name!r}; registered methods: {method_names()}. A method is a "
                          f"module hf_spec/training/methods/<name>.py that registers a TrainingMethod.")
    return _REGISTRY[name]


def method_names() -> list[str]:
    """Every method this package registers (their modules imported), plus any registered from elsewhere."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    return sorted(_REGISTRY)


def method_sections(name: str) -> dict[str, type]:
    return dict(get_method(name).sections)
