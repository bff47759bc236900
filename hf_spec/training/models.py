"""Where recipe targets come from: ``hf_spec.models`` resolves every name (local folders, Hub ids, and
``hf_spec:<name>`` for hf_spec's offline models and ``hf_spec:tiny-random-llama``, see ``hf_spec.tiny_model``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models import MODEL_PREFIX as PREFIX  # noqa: F401  (used by provenance)
from ..models import models_dir as models_cache  # noqa: F401  (used by tests)
from ..models import load_model, resolve_model
from ..tiny_model import tiny_tokenizer  # noqa: F401  (used by tests)


def resolve_model_path(name_or_path: str) -> str:
    """A path or Hub id that ``from_pretrained`` understands; an offline model must be prepared already."""
    return resolve_model(name_or_path, prepare=False)


def load_target(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None):
    """``(model, tokenizer)`` of the target (``hf_spec.models.load_model``: eval mode), with ``use_cache`` off for
    training; an offline model must be prepared already."""
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, tokenizer = load_model(name_or_path, getattr(torch, dtype), prepare=False, **options)
    model.config.use_cache = False
    return model, tokenizer


def load_tokenizer(name_or_path: str):
    """The target's tokenizer alone (e.g. to find the data prepared for it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


@contextmanager
def unpartitioned():
    """Load and run whole models on this rank alone while a DeepSpeed ZeRO-3 launch is active.

    accelerate registers its DeepSpeed config with transformers even with ``zero3_init_flag: false``;
    ``from_pretrained`` would then partition the weights with ``deepspeed.zero.Init`` (a collective call:
    it hangs when one rank loads alone) and ``generate()`` would sync with ranks that are not generating.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    holder = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)  # transformers keeps it only as a weakref
    config_object = holder() if holder is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config_object is not None:
            hf_deepspeed.set_hf_deepspeed_config(config_object)
