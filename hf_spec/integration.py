"""The generate() hook: both entry points into hf_spec's loop go through one normalisation.

``import hf_spec`` wraps ``GenerationMixin.generate`` once. The wrapper acts on two kinds of call:

- ``generate(..., assistant_model=<hf_spec Drafter>)``
- ``generate(..., custom_generate=hf_spec.speculative_generate, drafter=<hf_spec Drafter>)``

For a callable ``custom_generate``, transformers forwards only the callable's own extra parameters:
it keeps the streamer and the tokenizer to itself (the streamer would see the prompt and nothing
else; stop strings would have no tokenizer). So both calls are rewritten the same way before the
original ``generate`` runs: arguments bound by name (a positional ``generation_config`` included),
the streamer handed to the loop as ``hf_spec_streamer``, and stop strings turned into a
``StopStringCriteria`` with the caller's tokenizer. transformers still prepares the generation
config, logits processors, stopping criteria and cache exactly as for plain decoding. Any other
call, including ``assistant_model=<PreTrainedModel>``, goes to transformers untouched.
"""

from __future__ import annotations

import copy
import functools
import inspect

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
    signature = inspect.signature(original)

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        arguments.pop("self")
        arguments.update(arguments.pop("kwargs", {}))
        drafter = _drafter_of(arguments)
        if drafter is None:
            return original(self, *args, **kwargs)
        return original(self, **speculative_call(self, arguments, drafter))

    setattr(generate, _MARK, True)
    GenerationMixin.generate = generate


def speculative_call(model, arguments: dict, drafter) -> dict:
    """``generate()`` arguments (by name) rewritten to run hf_spec's loop with ``drafter`` through the callable
    ``custom_generate`` path; also what the ``custom_generate`` Hub repo's entry point does (``hub_generate.py``)."""
    arguments["custom_generate"] = speculative_generate
    arguments["drafter"] = drafter
    arguments["hf_spec_streamer"] = arguments.pop("streamer", None)
    _move_stop_strings_into_criteria(model, arguments)
    return arguments


def _drafter_of(arguments: dict) -> Drafter | None:
    """The hf_spec drafter this call asks for (removing it from ``arguments``), or ``None``."""
    assistant = arguments.get("assistant_model")
    through_callable = arguments.get("custom_generate") is speculative_generate
    if isinstance(assistant, Drafter):
        if arguments.get("custom_generate") is not None:
            raise UnsupportedError("Pass either an hf_spec drafter as assistant_model or custom_generate, not both.")
        return arguments.pop("assistant_model")
    if not through_callable:
        return None
    drafter = arguments.pop("drafter", None)
    if not isinstance(drafter, Drafter):
        raise UnsupportedError(
            "custom_generate=hf_spec.speculative_generate needs `drafter=` an hf_spec Drafter (e.g. "
            f"hf_spec.PromptLookupDrafter()), got {type(drafter).__name__}."
        )
    if assistant is not None:
        raise UnsupportedError("Pass the drafter as drafter= with custom_generate, without assistant_model.")
    return drafter


def _move_stop_strings_into_criteria(model, arguments: dict) -> None:
    """Build the stop-string criterion generate() would build, since the loop never sees the tokenizer."""
    config: GenerationConfig | None = arguments.get("generation_config")
    stop_strings = arguments.pop("stop_strings", None)
    if stop_strings is None and config is not None:
        stop_strings = config.stop_strings
    if stop_strings is None:
        stop_strings = model.generation_config.stop_strings
    tokenizer = arguments.pop("tokenizer", None)
    if stop_strings is None:
        return
    if tokenizer is None:
        raise UnsupportedError("stop_strings need the tokenizer: pass tokenizer=... to generate().")
    criteria = StoppingCriteriaList(arguments.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    arguments["stopping_criteria"] = criteria
    arguments["stop_strings"] = None
    if config is not None and config.stop_strings is not None:
        config = copy.deepcopy(config)
        config.stop_strings = None
        arguments["generation_config"] = config
