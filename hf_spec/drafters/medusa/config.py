"""What a Medusa checkpoint is: ``MedusaConfig`` (``config.json`` of a saved set of heads)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ...training.hub import CheckpointError
from .rank_tree import prior_rank_accuracies, validate_rank_accuracies, validate_rank_paths

FORMAT_VERSION = 1


@dataclass
class MedusaConfig:
    """What a Medusa checkpoint is: head shapes, how they project to the vocabulary, and how to draft.

    Attributes:
        hidden_size: the target's hidden size (the heads' input and residual width).
        vocab_size: rows of the target's output embedding (the heads' output width).
        num_heads: ``K``; head ``k`` drafts depth ``k + 1`` below the root.
        num_layers: residual blocks per head (``n``).
        share_lm_head: project with the target's frozen ``lm_head`` (True) or with a per-head copy of it.
        logit_softcapping: the target's final logit soft-capping, applied to head logits too (Gemma-2 style).
        medusa_version: 1 (target frozen) or 2 (trained with LoRA adapters on the target; see ``adapter``).
        adapter: subfolder holding the Medusa-2 PEFT adapter, ``None`` for Medusa-1.
        base_model: name or path of the target the heads were trained for (informational).
        rank_paths: the static tree to draft, as rank paths (``rank_tree.py``); ``None`` derives one from
            ``head_rank_accuracies``. Older checkpoints store it as ``"tree"``; ``from_dict`` reads that too.
        head_rank_accuracies: ``[k][r]``, measured probability that the target's token is head ``k``'s
            ``r``-th ranked token (from the held-out evaluation at the end of training).
        default_num_nodes: node budget of the derived tree.
        draft_vocab_size: ``N`` when the heads score only a draft vocabulary of ``N`` target tokens (VocabTrim /
            FR-Spec / EAGLE-3's d2t; saved beside ``config.json`` as ``draft_vocab.safetensors`` + ``.json``),
            ``None`` when they score the whole vocabulary. Own projections then have ``N`` rows.
    """

    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    share_lm_head: bool = True
    logit_softcapping: float | None = None
    medusa_version: int = 1
    adapter: str | None = None
    base_model: str | None = None
    rank_paths: list[list[int]] | None = None
    head_rank_accuracies: list[list[float]] | None = None
    default_num_nodes: int = 32
    draft_vocab_size: int | None = None
    method: str = "medusa"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name in ("hidden_size", "vocab_size", "num_heads", "num_layers", "default_num_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MedusaConfig.{name} must be a positive integer, got {value!r}.")
        if self.draft_vocab_size is not None and (not isinstance(self.draft_vocab_size, int)
                                                  or not 0 < self.draft_vocab_size <= self.vocab_size):
            raise ValueError(f"MedusaConfig.draft_vocab_size must be None or an integer in [1, {self.vocab_size}], "
                             f"got {self.draft_vocab_size!r}.")
        if self.medusa_version not in (1, 2):
            raise ValueError(f"MedusaConfig.medusa_version must be 1 or 2, got {self.medusa_version!r}.")
        if self.method != "medusa":
            raise CheckpointError(f"This checkpoint is for method {self.method!r}, not Medusa.")
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint format {self.format_version} is newer than this hf_spec understands "
                                  f"({FORMAT_VERSION}); upgrade hf_spec.")
        if self.rank_paths is not None:
            validate_rank_paths([tuple(path) for path in self.rank_paths], self.num_heads)
        if self.head_rank_accuracies is not None:
            validate_rank_accuracies(self.head_rank_accuracies, self.num_heads)

    def to_dict(self) -> dict:
        """The ``config.json`` values; ``draft_vocab_size`` only when set, so heads without a draft vocabulary
        keep the files (and stay loadable by) earlier hf_spec versions."""
        values = asdict(self)
        if values["draft_vocab_size"] is None:
            del values["draft_vocab_size"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> MedusaConfig:
        if "tree" in values:  # the old name of rank_paths
            if "rank_paths" in values:
                raise CheckpointError("Medusa config has both 'tree' (the old name of 'rank_paths') and 'rank_paths'.")
            values = {("rank_paths" if key == "tree" else key): value for key, value in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"Unknown Medusa config keys {unknown} (checkpoint from a newer hf_spec, or not "
                                  "a Medusa checkpoint).")
        missing = sorted(name for name in ("hidden_size", "vocab_size") if name not in values)
        if missing:
            raise CheckpointError(f"Medusa config lacks {missing}.")
        return cls(**values)


def head_rank_accuracies(config: MedusaConfig) -> list[list[float]]:
    """The checkpoint's measured rank accuracies, or the prior when it has none."""
    return config.head_rank_accuracies or prior_rank_accuracies(config.num_heads)
