"""The generate() hook: ``model.generate(assistant_model=<hf_spec drafter>)`` runs hf_spec's loop.

``import hf_spec`` wraps ``GenerationMixin.generate`` once. The wrapper only acts when
``assistant_model`` is an hf_spec ``Drafter``: it then calls the original ``generate`` with
``custom_generate=speculative_generate``, so transformers still prepares the generation config,
logits processors, stopping criteria and cache exactly as for plain decoding. Any other call,
including ``assistant_model=<PreTrainedModel>``, goes to transformers untouched.
"""

from __future__ import annotations

import copy
import functools

from transformers import GenerationConfig, StoppingCriteriaList
from transformers.generation import GenerationMixin
from transformers.generation.stopping_criteria import StopStringCriteria

from .drafters.base import Drafter
from .engine.loop import speculative_generate
from .errors import UnsupportedError

_MARK = "_hf_spec_wrapped"


def install() -> None:
    """Wrap ``GenerationMixin.generate`` (idempotent)."""
    original = GenerationMixin.generate
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def generate(self, *args, assistant_model=None, **kwargs):
        if not isinstance(assistant_model, Drafter):
            return original(self, *args, assistant_model=assistant_model, **kwargs)
        if kwargs.get("custom_generate") is not None:
            raise UnsupportedError("Pass either an hf_spec drafter as assistant_model or custom_generate, not both.")
        _move_stop_strings_into_criteria(self, kwargs)
        return original(
            self,
            *args,
            custom_generate=speculative_generate,
            drafter=assistant_model,
            hf_spec_streamer=kwargs.pop("streamer", None),
            **kwargs,
        )

    setattr(generate, _MARK, True)
    GenerationMixin.generate = generate


def _move_stop_strings_into_criteria(model, kwargs: dict) -> None:
    """transformers drops ``tokenizer`` for callable custom_generate, so build the stop-string criterion here."""
    config: GenerationConfig | None = kwargs.get("generation_config")
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is None and config is not None:
        stop_strings = config.stop_strings
    if stop_strings is None:
        stop_strings = model.generation_config.stop_strings
    if stop_strings is None:
        return
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise UnsupportedError("stop_strings need the tokenizer: pass tokenizer=... to generate().")
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria
    kwargs["stop_strings"] = None
    if config is not None and config.stop_strings is not None:
        config = copy.deepcopy(config)
        config.stop_strings = None
        kwargs["generation_config"] = config
