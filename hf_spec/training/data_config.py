"""The ``data:`` section of a training recipe: where conversations come from and what is built from them.

It is a superset of the first recipe's data section (every earlier key keeps its meaning and default),
plus the settings of batched self-distillation (``self_distill.py``), of the sharded feature cache
(``feature_cache.py``) and of the draft vocabulary (``vocab_selection.py``). ``prepare_data.py`` builds
everything these settings describe once, on disk, before any training process starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FEATURE_DTYPES = ("float16", "bfloat16", "float32")
CUT_REPLY_POLICIES = ("drop", "mask", "keep")


@dataclass
class DataSection:
    source: str = "sharegpt"  # "sharegpt" (the PyPI package) or a path to a ShareGPT-format JSON array
    num_conversations: int | None = 1000  # usable conversations read from the start of the file
    heldout_fraction: float = 0.05  # conversations whose hashed id falls below this go to the held-out split
    max_length: int = 512
    max_turns: int | None = None  # keep at most this many user/assistant exchanges per conversation
    labels: str = "soft"  # "soft": the target's next-token distributions; "hard": the data's tokens
    self_distillation: bool = False  # regenerate assistant turns with the target first
    self_distillation_max_new_tokens: int = 256
    self_distillation_do_sample: bool = False
    self_distillation_temperature: float = 0.7
    # Replies are generated at these temperatures (0 = greedy), each conversation at one of them chosen by a
    # hash of its id; empty: one temperature from self_distillation_do_sample / self_distillation_temperature.
    self_distillation_temperatures: list[float] = field(default_factory=list)
    self_distillation_batch_size: int = 16  # conversations per batched generate() call (left padded)
    self_distillation_min_new_tokens: int = 16  # a turn whose room left under max_length is smaller is not generated
    # A turn whose prompt (history included) is longer is not generated: bounds the prefill, which on a CPU costs
    # about as much per token as decoding (None: only max_length bounds it).
    self_distillation_max_prompt_tokens: int | None = None
    # A reply cut by the length cap (no end-of-turn token): "drop" it (the conversation ends before it), "mask" it
    # (kept as context with no loss; the conversation ends after it) or "keep" it (with its loss; the conversation
    # ends after it). Degenerate loops are dropped under "keep" and handled like cut replies otherwise.
    self_distillation_cut_replies: str = "drop"
    self_distillation_chunk_conversations: int = 256  # conversations per resumable token shard
    # A reply whose last loop_window tokens hold fewer than loop_min_distinct distinct tokens is a degenerate loop:
    # generation stops there and it is handled like a cut reply (0 disables the check).
    self_distillation_loop_window: int = 64
    self_distillation_loop_min_distinct: int = 16
    cache_hidden_states: bool = False  # precompute the frozen target's last hidden states (Medusa-1 only)
    # Target features cached by prepare-data: ints are transformers' output_hidden_states indices taken
    # before the final norm (0 = embeddings, i = output of layer i, num_layers = last layer, pre-norm);
    # "final" is the last hidden state after the final norm (what the lm_head reads).
    feature_layers: list = field(default_factory=list)
    feature_dtype: str = "float16"  # storage dtype of cached features: float16, bfloat16 or float32
    feature_shard_tokens: int = 65536  # tokens per feature shard (bounds memory while caching)
    feature_batch_tokens: int = 4096  # tokens per target forward while caching
    cache_dir: str = "outputs/data_cache"
    seed: int = 0

    def reply_temperatures(self) -> list[float]:
        """Temperatures the self-distilled replies are generated at (0.0 means greedy)."""
        if self.self_distillation_temperatures:
            return [float(value) for value in self.self_distillation_temperatures]
        return [float(self.self_distillation_temperature) if self.self_distillation_do_sample else 0.0]

    def cached_features(self) -> list:
        """Feature names the cache holds: ``feature_layers``, or ``["final"]`` for ``cache_hidden_states``."""
        if self.feature_layers:
            return list(self.feature_layers)
        return ["final"] if self.cache_hidden_states else []


def as_data_section(config) -> DataSection:
    """A ``DataSection`` from any object with the same fields (e.g. an older copy of the dataclass);
    fields it lacks take their defaults."""
    if isinstance(config, DataSection):
        return config
    known = {spec.name for spec in dataclasses.fields(DataSection)}
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    return DataSection(**{name: value for name, value in values.items() if name in known})


def data_section_problems(config: DataSection) -> list[str]:
    """Human-readable problems with the data settings (empty when they are valid)."""
    problems = []
    if config.labels not in ("soft", "hard"):
        problems.append(f"data.labels must be 'soft' or 'hard', got {config.labels!r}")
    if not 0 < config.heldout_fraction < 1:
        problems.append("data.heldout_fraction must be between 0 and 1")
    if config.max_length < 2:
        problems.append("data.max_length must be at least 2")
    if any(float(value) < 0 for value in config.self_distillation_temperatures):
        problems.append("data.self_distillation_temperatures must be >= 0 (0 means greedy)")
    if config.self_distillation_cut_replies not in CUT_REPLY_POLICIES:
        problems.append(f"data.self_distillation_cut_replies must be one of {CUT_REPLY_POLICIES}, "
                        f"got {config.self_distillation_cut_replies!r}")
    for name in ("self_distillation_batch_size", "self_distillation_chunk_conversations", "self_distillation_max_new_tokens",
                 "feature_shard_tokens", "feature_batch_tokens"):
        if getattr(config, name) < 1:
            problems.append(f"data.{name} must be at least 1")
    if config.feature_dtype not in FEATURE_DTYPES:
        problems.append(f"data.feature_dtype must be one of {FEATURE_DTYPES}, got {config.feature_dtype!r}")
    for layer in config.feature_layers:
        if not (layer == "final" or (isinstance(layer, int) and not isinstance(layer, bool))):
            problems.append(f"data.feature_layers entries are output_hidden_states indices (int) or 'final', got {layer!r}")
    if len(set(map(str, config.feature_layers))) != len(config.feature_layers):
        problems.append("data.feature_layers lists a layer twice")
    return problems
