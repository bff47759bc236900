"""What a Falcon checkpoint is: ``FalconConfig`` (``config.json`` of a saved Falcon drafter)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ...training.hub import CheckpointError

FORMAT_VERSION = 1
POSITIVE_INTS = ("hidden_size", "vocab_size", "num_target_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "block_size", "num_passes", "tree_top_k", "tree_budget")


@dataclass
class FalconConfig:
    """Shapes of a Falcon semi-autoregressive drafter and the target it reads.

    Attributes:
        hidden_size, vocab_size, num_target_layers: the target's (its lm_head rows, its decoder layers). The drafter
            reads the target's last hidden state after its final norm, what the lm_head reads.
        num_attention_heads, num_key_value_heads, head_dim, intermediate_size, rms_norm_eps, rope_theta: the
            drafter's decoder layer (copied from the target's config).
        block_size: ``k``, the tokens one drafter pass emits (the paper's k = 2).
        num_passes: passes per draft: the default tree is ``block_size * num_passes`` deep.
        draft_vocab_size: ``N`` when the drafter scores a draft vocabulary (``draft_vocab.safetensors`` beside the
            weights), ``None`` for the whole vocabulary.
        logit_softcapping: the target's final logit soft-capping, applied to draft logits too.
        base_model: the target the drafter was trained for (informational).
        tree_top_k, tree_budget: the default tree (grown pass by pass, see ``FalconDrafter``).
        step_top1: measured held-out top-1 agreement with the target per drafted depth.
    """

    hidden_size: int
    vocab_size: int
    num_target_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    block_size: int = 2
    num_passes: int = 3
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    draft_vocab_size: int | None = None
    logit_softcapping: float | None = None
    base_model: str | None = None
    tree_top_k: int = 4
    tree_budget: int = 16
    step_top1: list[float] | None = None
    method: str = "falcon"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.method != "falcon":
            raise CheckpointError(f"This checkpoint is for method {self.method!r}, not Falcon.")
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint format {self.format_version} is newer than this hf_spec understands "
                                  f"({FORMAT_VERSION}); upgrade hf_spec.")
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FalconConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"FalconConfig: {self.num_attention_heads} attention heads cannot share "
                             f"{self.num_key_value_heads} key/value heads evenly.")
        size = self.draft_vocab_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                                 or not 0 < size <= self.vocab_size):
            raise ValueError(f"FalconConfig.draft_vocab_size must be None or an integer in [1, {self.vocab_size}], "
                             f"got {size!r}.")

    @property
    def tree_depth(self) -> int:
        return self.block_size * self.num_passes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> FalconConfig:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"Unknown Falcon config keys {unknown} (checkpoint from a newer hf_spec, or not a "
                                  "Falcon checkpoint).")
        if values.get("method", "falcon") != "falcon":
            raise CheckpointError(f"This checkpoint is for method {values['method']!r}, not Falcon.")
        return cls(**values)
