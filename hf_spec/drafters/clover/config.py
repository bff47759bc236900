"""What a Clover-2 checkpoint is: ``CloverConfig`` (``config.json`` of saved Clover-2 heads)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ...training.hub import CheckpointError

FORMAT_VERSION = 1
POSITIVE_INTS = ("hidden_size", "vocab_size", "num_target_layers", "num_heads", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size", "tree_top_k", "tree_budget")


@dataclass
class CloverConfig:
    """Shapes of Clover-2 heads and the target they read.

    Attributes:
        hidden_size, vocab_size, num_target_layers: the target's (its lm_head rows, its decoder layers). The heads
            read the target's last hidden state before the final norm (``hf_spec.engine.features`` index
            ``num_target_layers``).
        num_heads: chained heads; head ``i`` drafts depth ``i + 1`` (the paper uses 5).
        num_attention_heads, num_key_value_heads, head_dim, intermediate_size, attention_bias, rms_norm_eps,
            rope_theta: the attention decoder's (the target's last decoder layer's, whose weights it starts from).
        draft_vocab_size: ``N`` when the heads score a draft vocabulary (``draft_vocab.safetensors`` beside the
            weights), ``None`` for the whole vocabulary.
        logit_softcapping: the target's final logit soft-capping, applied to draft logits too.
        base_model: the target the heads were trained for (informational).
        tree_top_k, tree_budget: the default dynamic tree (its depth is ``num_heads``).
        head_top1: measured held-out top-1 agreement with the target per head.
    """

    hidden_size: int
    vocab_size: int
    num_target_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_heads: int = 5
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    draft_vocab_size: int | None = None
    logit_softcapping: float | None = None
    base_model: str | None = None
    tree_top_k: int = 4
    tree_budget: int = 16
    head_top1: list[float] | None = None
    method: str = "clover"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.method != "clover":
            raise CheckpointError(f"This checkpoint is for method {self.method!r}, not Clover-2.")
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint format {self.format_version} is newer than this hf_spec understands "
                                  f"({FORMAT_VERSION}); upgrade hf_spec.")
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CloverConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"CloverConfig: {self.num_attention_heads} attention heads cannot share "
                             f"{self.num_key_value_heads} key/value heads evenly.")
        size = self.draft_vocab_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                                 or not 0 < size <= self.vocab_size):
            raise ValueError(f"CloverConfig.draft_vocab_size must be None or an integer in [1, {self.vocab_size}], "
                             f"got {size!r}.")

    @property
    def feature_layer(self) -> int:
        """The target feature the heads read: the last decoder layer's output, before the final norm."""
        return self.num_target_layers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CloverConfig:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"Unknown Clover-2 config keys {unknown} (checkpoint from a newer hf_spec, or not "
                                  "a Clover-2 checkpoint).")
        if values.get("method", "clover") != "clover":
            raise CheckpointError(f"This checkpoint is for method {values['method']!r}, not Clover-2.")
        return cls(**values)
