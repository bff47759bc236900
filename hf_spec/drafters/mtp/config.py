"""What a gated-LoRA MTP checkpoint is: ``MTPConfig`` (``config.json`` beside the adapter's ``model.safetensors``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ...training.hub import CheckpointError
from .gate import DEFAULT_TARGET_MODULES

FORMAT_VERSION = 1


@dataclass
class MTPConfig:
    """Shapes of a gated-LoRA multi-token-prediction adapter (Samragh et al. 2025, "Your LLM Knows the Future:
    Uncovering Its Multi-Token Prediction Potential") and of the base model it was trained on.

    Attributes:
        hidden_size, vocab_size, model_type, num_hidden_layers: the base causal LM's (checked when loading onto one).
        num_mask_tokens: ``k``, mask tokens appended per block (future tokens predicted beyond the next one).
        lora_rank, lora_alpha: the gated LoRA's rank ``r`` and scale ``alpha`` (the update is ``B A x * alpha / r``).
        target_modules: names of the decoder-layer linears that get the gated LoRA.
        sampler_hidden_size: width of the sampler MLP's hidden layer (``None``: the base hidden size).
        sampler_residual: the sampler adds its MLP output to the mask latent (last layer zero-initialised, so a fresh
            sampler reproduces the base head on the mask latent) instead of replacing it.
        base_model: the base model's name (informational).
    """

    hidden_size: int
    vocab_size: int
    model_type: str
    num_hidden_layers: int
    num_mask_tokens: int = 8
    lora_rank: int = 128
    lora_alpha: float = 128.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    sampler_hidden_size: int | None = None
    sampler_residual: bool = True
    base_model: str | None = None
    method: str = "mtp"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.method != "mtp":
            raise CheckpointError(f"This checkpoint is for method {self.method!r}, not gated-LoRA MTP.")
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint format {self.format_version} is newer than this hf_spec understands "
                                  f"({FORMAT_VERSION}); upgrade hf_spec.")
        for name in ("hidden_size", "vocab_size", "num_hidden_layers", "num_mask_tokens", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MTPConfig.{name} must be a positive integer, got {value!r}.")
        if self.sampler_hidden_size is not None and (isinstance(self.sampler_hidden_size, bool)
                                                     or not isinstance(self.sampler_hidden_size, int)
                                                     or self.sampler_hidden_size < 1):
            raise ValueError(f"MTPConfig.sampler_hidden_size must be None or a positive integer, "
                             f"got {self.sampler_hidden_size!r}.")
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ValueError(f"MTPConfig.model_type must name the base architecture, got {self.model_type!r}.")
        if not self.target_modules or not all(isinstance(name, str) and name for name in self.target_modules):
            raise ValueError(f"MTPConfig.target_modules must be a non-empty list of module names, "
                             f"got {self.target_modules!r}.")
        self.target_modules = list(self.target_modules)
        self.lora_alpha = float(self.lora_alpha)

    @property
    def sampler_width(self) -> int:
        return self.sampler_hidden_size or self.hidden_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MTPConfig:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"Unknown MTP config keys {unknown} (checkpoint from a newer hf_spec, or not a "
                                  "gated-LoRA MTP checkpoint).")
        if values.get("method", "mtp") != "mtp":
            raise CheckpointError(f"This checkpoint is for method {values['method']!r}, not gated-LoRA MTP.")
        return cls(**values)
