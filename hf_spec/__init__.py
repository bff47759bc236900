"""hf_spec: speculative decoding inside Hugging Face ``generate()``.

    import hf_spec
    out = model.generate(**inputs, assistant_model=hf_spec.PromptLookupDrafter(), max_new_tokens=128)
"""

from .engine.drafter import DraftRequest, Drafter, StepOutcome
from .drafters.draft_model import DraftModelDrafter
from .drafters.clover import CloverConfig, CloverDrafter, CloverHeads
from .drafters.eagle3 import Eagle3Config, Eagle3Draft, Eagle3Drafter
from .drafters.falcon import FalconConfig, FalconDraft, FalconDrafter
from .drafters.medusa import MedusaDrafter, MedusaConfig, MedusaHeads
from .drafters.mtp import MTPConfig, MTPDrafter, MTPModel
from .drafters.prompt_lookup import PromptLookupDrafter
from .engine.loop import allow_model_type, speculative_generate
from .engine.goodput import CostCurve
from .engine.stats import GenerationStats
from .engine.tree import DraftTree
from .cpu_fast_path import accelerate_for_cpu
from .errors import UnsupportedError
from .integration import install as _install

_install()

__all__ = [
    "DraftModelDrafter",
    "DraftRequest",
    "DraftTree",
    "Drafter",
    "CloverConfig",
    "CostCurve",
    "CloverDrafter",
    "CloverHeads",
    "Eagle3Config",
    "Eagle3Draft",
    "Eagle3Drafter",
    "FalconConfig",
    "FalconDraft",
    "FalconDrafter",
    "GenerationStats",
    "MedusaConfig",
    "MedusaDrafter",
    "MedusaHeads",
    "MTPConfig",
    "MTPDrafter",
    "MTPModel",
    "PromptLookupDrafter",
    "StepOutcome",
    "UnsupportedError",
    "accelerate_for_cpu",
    "allow_model_type",
    "speculative_generate",
]
__version__ = "0.1.0"
