"""The drafter protocol lives in the engine (``hf_spec.engine.drafter``); re-exported here for drafters."""

from ..engine.drafter import DraftRequest, Drafter, StepOutcome

__all__ = ["DraftRequest", "Drafter", "StepOutcome"]
