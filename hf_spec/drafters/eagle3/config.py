"""What an EAGLE-3 checkpoint is: ``Eagle3Config`` (``config.json`` of a saved draft layer)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ...training.hub import CheckpointError

FORMAT_VERSION = 1


@dataclass
class Eagle3Config:
    """Shapes of an EAGLE-3 draft layer and the target it reads.

    Attributes:
        hidden_size: the target's hidden size (the draft layer's width).
        vocab_size: rows of the target's output embedding.
        num_target_layers: decoder layers of the target (the feature layer ids are checked against it).
        feature_layers: the target layers fused (``hf_spec.engine.features`` indices: the *inputs* of those
            decoder layers), by default ``(2, n // 2, n - 3)`` as in Li et al. 2025.
        num_attention_heads, num_key_value_heads, head_dim, intermediate_size, rms_norm_eps, rope_theta: the
            draft decoder layer's attention and MLP (copied from the target's config by ``for_target``).
        draft_vocab_size: ``N`` when the draft scores a draft vocabulary (``draft_vocab.safetensors`` beside the
            weights), ``None`` for the whole vocabulary.
        logit_softcapping: the target's final logit soft-capping, applied to draft logits too.
        base_model: the target the layer was trained for (informational).
        tree_depth, tree_top_k, tree_budget: the default EAGLE-2 dynamic tree.
        step_top1: measured held-out top-1 agreement with the target per drafting step (training-time test).
    """

    hidden_size: int
    vocab_size: int
    num_target_layers: int
    feature_layers: list[int]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    draft_vocab_size: int | None = None
    logit_softcapping: float | None = None
    base_model: str | None = None
    tree_depth: int = 5
    tree_top_k: int = 4
    tree_budget: int = 16
    step_top1: list[float] | None = None
    method: str = "eagle3"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.method != "eagle3":
            raise CheckpointError(f"This checkpoint is for method {self.method!r}, not EAGLE-3.")
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint format {self.format_version} is newer than this hf_spec understands "
                                  f"({FORMAT_VERSION}); upgrade hf_spec.")
        for name in ("hidden_size", "vocab_size", "num_target_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "tree_depth", "tree_top_k", "tree_budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Eagle3Config.{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Eagle3Config: {self.num_attention_heads} attention heads cannot share "
                             f"{self.num_key_value_heads} key/value heads evenly.")
        layers = list(self.feature_layers)
        if not layers or any(isinstance(layer, bool) or not isinstance(layer, int)
                             or not 0 <= layer <= self.num_target_layers for layer in layers):
            raise ValueError(f"Eagle3Config.feature_layers must be layer indices in [0, {self.num_target_layers}], "
                             f"got {self.feature_layers!r}.")
        if len(set(layers)) != len(layers):
            raise ValueError(f"Eagle3Config.feature_layers names a layer twice: {self.feature_layers!r}.")
        if self.draft_vocab_size is not None and (isinstance(self.draft_vocab_size, bool)
                                                  or not isinstance(self.draft_vocab_size, int)
                                                  or not 0 < self.draft_vocab_size <= self.vocab_size):
            raise ValueError(f"Eagle3Config.draft_vocab_size must be None or an integer in [1, {self.vocab_size}], "
                             f"got {self.draft_vocab_size!r}.")

    @property
    def feature_size(self) -> int:
        """Width of the fused input: the chosen layers' hidden states concatenated."""
        return len(self.feature_layers) * self.hidden_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Eagle3Config:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"Unknown EAGLE-3 config keys {unknown} (checkpoint from a newer hf_spec, or not "
                                  "an EAGLE-3 checkpoint).")
        if values.get("method", "eagle3") != "eagle3":
            raise CheckpointError(f"This checkpoint is for method {values['method']!r}, not EAGLE-3.")
        return cls(**values)


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers of an ``num_layers``-layer target: the inputs of layers ``2``,
    ``n // 2`` and ``n - 3`` (a tiny target gets the distinct ones of those, clamped to its layers)."""
    chosen = [min(max(layer, 0), num_layers) for layer in (2, num_layers // 2, num_layers - 3)]
    return sorted(set(chosen))
