"""Former home of the Medusa objective, kept importable: it lives in ``hf_spec.training.methods.medusa_objective``."""

from .methods.medusa_objective import HeadBatch, MedusaObjective

__all__ = ["HeadBatch", "MedusaObjective"]
