"""hf_spec's loop as a ``custom_generate`` Hub repo: this module becomes the repo's ``custom_generate/generate.py``.

``hf-spec hub custom-generate`` copies it, with every module it imports (flattened, relative imports only, as
transformers requires), into a repo folder; nobody needs hf_spec installed to run it::

    out = model.generate(**inputs, custom_generate="<org>/hf-spec-generate", trust_remote_code=True,
                         prompt_lookup_num_tokens=8)                         # prompt lookup
    out = model.generate(**inputs, custom_generate="<org>/hf-spec-generate", trust_remote_code=True,
                         assistant_model=draft_model)                        # a draft model
    out = model.generate(**inputs, custom_generate="<org>/hf-spec-generate", trust_remote_code=True,
                         drafter=drafter)                                    # any hf_spec drafter object

The drafter is chosen from the arguments transformers users already know (``assistant_model``,
``prompt_lookup_num_tokens``) or given as ``drafter=``; hf_spec's options (``verification``, ``tree``,
``draft_length``...) pass through unchanged.
"""

from __future__ import annotations

import inspect

from transformers import PreTrainedModel
from transformers.generation import GenerationMixin

from .drafters.draft_model import DraftModelDrafter
from .drafters.prompt_lookup import PromptLookupDrafter
from .errors import UnsupportedError
from .integration import speculative_call


def generate(model, *args, **kwargs):
    """The ``custom_generate`` entry point: transformers calls it with ``generate()``'s arguments and ``model``."""
    arguments = inspect.signature(GenerationMixin.generate).bind(model, *args, **kwargs).arguments
    arguments.pop("self")
    arguments.update(arguments.pop("kwargs", {}))
    arguments = {name: value for name, value in arguments.items() if name != "custom_generate"}
    drafter = drafter_from_arguments(arguments)
    return GenerationMixin.generate(model, **speculative_call(model, arguments, drafter))


def drafter_from_arguments(arguments: dict):
    """The drafter a call asks for, removing what selected it from ``arguments``."""
    drafter = arguments.pop("drafter", None)
    assistant = arguments.pop("assistant_model", None)
    lookup_tokens = arguments.pop("prompt_lookup_num_tokens", None)
    chosen = [name for name, value in (("drafter", drafter), ("assistant_model", assistant),
                                       ("prompt_lookup_num_tokens", lookup_tokens)) if value is not None]
    if len(chosen) != 1:
        raise UnsupportedError(
            "hf_spec's custom_generate needs exactly one of drafter= (an hf_spec drafter), assistant_model= (a draft "
            f"model with the target's tokenizer) or prompt_lookup_num_tokens= (prompt lookup); got {chosen or 'none'}.")
    if drafter is not None:
        if not (callable(getattr(drafter, "propose", None)) and callable(getattr(drafter, "observe", None))):
            raise UnsupportedError(
                f"drafter= must be an hf_spec drafter (propose/observe), got {type(drafter).__name__}.")
        return drafter
    if assistant is not None:
        if not isinstance(assistant, PreTrainedModel):
            raise UnsupportedError(
                f"assistant_model= must be a transformers model here, got {type(assistant).__name__}; pass an hf_spec "
                "drafter as drafter=.")
        return DraftModelDrafter(assistant)
    return PromptLookupDrafter(num_tokens=int(lookup_tokens))
