"""A draft vocabulary: the subset of the target's vocabulary a drafter projects onto.

The output projection (lm_head) is a large part of a small drafter's cost: 28M of SmolLM2-135M's 135M
parameters, 136M of Qwen2.5-0.5B's 494M. Most of those rows are tokens the target almost never emits.
VocabTrim (Goel et al. 2025), FR-Spec (Zhao et al. 2025) and EAGLE-3 (Li et al. 2025) let the drafter
score only the ``N`` tokens the target emits most often, selected from the target's own outputs.

The mapping uses EAGLE-3's convention (also the ``speculators`` / vLLM format):

- ``d2t`` (int64, ``N``): offsets, ``target id = draft id + d2t[draft id]``;
- ``t2d`` (bool, ``V``): which target ids are in the draft vocabulary.

Draft ids are the selected target ids in increasing order, so ``d2t`` is non-decreasing.

Verification stays exact: a draft distribution is scattered into the full vocabulary with exactly zero
mass outside the subset (``to_target_probs``), and rejection sampling only needs ``q`` to be the
distribution the draft token was drawn from. The target may still emit any token: a rejected draft is
corrected from the residual ``max(p - q, 0)``, which covers tokens outside the subset.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UnsupportedError

WEIGHTS_NAME = "draft_vocab.safetensors"
CONFIG_NAME = "draft_vocab.json"


class DraftVocabulary:
    """``N`` target token ids a drafter scores, and the maps between draft and target ids.

    Args:
        token_ids: the target ids kept (any order, no repeats); draft id ``i`` is the ``i``-th smallest.
        target_vocab_size: size ``V`` of the target's vocabulary (its lm_head rows).
        metadata: JSON-able notes saved with the mapping (how it was selected, coverage, ...).
    """

    def __init__(self, token_ids, target_vocab_size: int, metadata: dict | None = None):
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("A draft vocabulary needs at least one token.")
        ids = torch.sort(ids).values
        if bool((ids[1:] == ids[:-1]).any()):
            raise ValueError("The draft vocabulary lists a token id twice.")
        if int(ids[0]) < 0 or int(ids[-1]) >= target_vocab_size:
            raise ValueError(f"Draft vocabulary ids must lie in [0, {target_vocab_size}); got {int(ids[0])}..{int(ids[-1])}.")
        self.draft_to_target = ids
        self.target_vocab_size = int(target_vocab_size)
        self.metadata = dict(metadata or {})
        self.target_to_draft = torch.full((self.target_vocab_size,), -1, dtype=torch.long)
        self.target_to_draft[ids] = torch.arange(ids.numel())
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}  # maps copied to accelerators, once

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_token_counts(cls, counts, size: int, always_include=(), metadata: dict | None = None) -> "DraftVocabulary":
        """The ``size`` most frequent tokens of ``counts`` (a ``V``-long tensor of occurrences), plus
        ``always_include`` (e.g. the end-of-turn tokens, which a drafter must be able to propose).
        Ties are broken by the lower token id."""
        counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
        forced = sorted({int(token) for token in always_include})
        if not 0 < size <= counts.numel():
            raise ValueError(f"size must be in [1, {counts.numel()}], got {size}.")
        if len(forced) > size:
            raise ValueError(f"size {size} is smaller than the {len(forced)} tokens that must be included.")
        ranked = counts.clone()
        ranked[forced] = float("inf")
        # stable descending sort: equal counts keep increasing token id order
        order = torch.sort(-ranked, stable=True).indices[:size]
        total = float(counts.sum())
        coverage = float(counts[order].sum()) / total if total > 0 else 0.0
        notes = {"selected_from_tokens": int(total), "coverage_of_counted_tokens": round(coverage, 6),
                 **(metadata or {})}
        return cls(order, counts.numel(), notes)

    @classmethod
    def from_d2t(cls, d2t, target_vocab_size: int, metadata: dict | None = None) -> "DraftVocabulary":
        d2t = torch.as_tensor(d2t, dtype=torch.long)
        return cls(torch.arange(d2t.numel()) + d2t, target_vocab_size, metadata)

    # ------------------------------------------------------------------ the EAGLE-3 tensors
    @property
    def size(self) -> int:
        return int(self.draft_to_target.numel())

    @property
    def d2t(self) -> torch.Tensor:
        return self.draft_to_target - torch.arange(self.size)

    @property
    def t2d(self) -> torch.Tensor:
        return self.target_to_draft >= 0

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other) -> bool:
        return (isinstance(other, DraftVocabulary) and self.target_vocab_size == other.target_vocab_size
                and torch.equal(self.draft_to_target, other.draft_to_target))

    def __repr__(self) -> str:
        return f"DraftVocabulary({self.size} of {self.target_vocab_size} target tokens)"

    # ------------------------------------------------------------------ id and distribution maps
    def draft_to_target_on(self, device: torch.device) -> torch.Tensor:
        """``draft_to_target`` on ``device`` (copied there once, not on every call)."""
        return self._map_on("draft_to_target", device)

    def _map_on(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.draft_to_target_on(draft_ids.device)[draft_ids]

    def to_draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of ``target_ids``; ``-1`` for tokens outside the draft vocabulary."""
        return self._map_on("target_to_draft", target_ids.device)[target_ids]

    def contains(self, target_ids: torch.Tensor) -> torch.Tensor:
        return self.to_draft_ids(target_ids) >= 0

    def to_target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """``(..., N)`` draft logits as ``(..., V)`` logits with ``-inf`` outside the draft vocabulary, so that
        softmax, argmax and the target's logits processors see target ids and give those tokens zero mass."""
        return self._scatter(draft_logits, float("-inf"))

    def to_target_probs(self, draft_probs: torch.Tensor) -> torch.Tensor:
        """``(..., N)`` draft probabilities as ``(..., V)`` probabilities, exactly zero outside the subset."""
        return self._scatter(draft_probs, 0.0)

    def _scatter(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        if values.shape[-1] != self.size:
            raise ValueError(f"Expected {self.size} draft-vocabulary scores in the last dimension, got {values.shape[-1]}.")
        full = values.new_full((*values.shape[:-1], self.target_vocab_size), fill)
        index = self.draft_to_target_on(values.device).expand_as(values)
        return full.scatter(-1, index, values)

    def trim_output_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of a ``(V, ...)`` output projection (or bias) that score the draft vocabulary."""
        if weight.shape[0] != self.target_vocab_size:
            raise UnsupportedError(f"The output projection has {weight.shape[0]} rows but this draft vocabulary maps a "
                                   f"{self.target_vocab_size}-token target vocabulary; select it for this target.")
        return weight[self.draft_to_target_on(weight.device)]

    def coverage(self, counts) -> float:
        """Fraction of the token occurrences in ``counts`` (``V``-long) that fall inside the draft vocabulary."""
        counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
        total = float(counts.sum())
        return float(counts[self.draft_to_target].sum()) / total if total > 0 else 0.0

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """``draft_vocab.safetensors`` (``d2t``, ``t2d``) and ``draft_vocab.json`` (sizes and metadata), each
        written atomically (a temporary file moved into place)."""
        from safetensors.torch import save_file

        from ..training.hub import atomic_write, atomic_write_text

        folder = Path(folder)
        tensors = {"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous()}
        atomic_write(folder / WEIGHTS_NAME, lambda temporary: save_file(tensors, temporary))
        config = {"draft_vocab_size": self.size, "target_vocab_size": self.target_vocab_size, "metadata": self.metadata}
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "DraftVocabulary":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}; save a DraftVocabulary there first.")
        tensors = load_file(str(folder / WEIGHTS_NAME))
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")) if (folder / CONFIG_NAME).is_file() else {}
        t2d = tensors["t2d"].bool()
        vocabulary = cls.from_d2t(tensors["d2t"], t2d.numel(), config.get("metadata"))
        if not torch.equal(vocabulary.t2d, t2d):
            raise ValueError(f"{folder / WEIGHTS_NAME} is inconsistent: t2d does not mark exactly the ids d2t maps to.")
        if config and (config.get("draft_vocab_size") != vocabulary.size
                       or config.get("target_vocab_size") != vocabulary.target_vocab_size):
            raise ValueError(f"{folder / CONFIG_NAME} sizes disagree with {WEIGHTS_NAME}.")
        return vocabulary


class _Logits:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class TrimmedOutputModel:
    """A causal LM whose forward scores only a draft vocabulary: its decoder, then the kept lm_head rows.

    Called like the model (same keyword arguments, ``logits_to_keep`` included); returns an object whose
    ``logits`` are ``(..., V)`` with ``-inf`` outside the draft vocabulary, so code written for the full
    model (logits processors, softmax, argmax over target ids) works unchanged while the output
    projection costs ``N / V`` of the full one. The kept rows are sliced once, here.
    """

    _SCALINGS = ("logit_scale", "logits_scaling", "output_multiplier_scale")

    def __init__(self, model, vocabulary: DraftVocabulary):
        text_config = model.config.get_text_config(decoder=True)
        scaled = [name for name in self._SCALINGS if getattr(text_config, name, None) not in (None, 1, 1.0)]
        if scaled:
            raise UnsupportedError(f"{type(model).__name__} scales its logits ({scaled}); a trimmed draft vocabulary "
                                   "is supported for models whose logits are lm_head(decoder output) (with optional "
                                   "final_logit_softcapping).")
        head = model.get_output_embeddings()
        self.model = model
        self.vocabulary = vocabulary
        self.decoder = model.get_decoder()
        self.weight = vocabulary.trim_output_rows(head.weight.detach())
        bias = getattr(head, "bias", None)
        self.bias = vocabulary.trim_output_rows(bias.detach()) if bias is not None else None
        self.softcap = getattr(text_config, "final_logit_softcapping", None)

    def __getattr__(self, name):  # config, dtype, device, ... of the wrapped model
        return getattr(self.model, name)

    def __call__(self, logits_to_keep: int = 0, **kwargs) -> _Logits:
        hidden = self.decoder(**kwargs).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return _Logits(self.vocabulary.to_target_logits(self.trimmed_logits(hidden)))

    def trimmed_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., N)`` logits over the draft vocabulary (draft ids) from decoder outputs."""
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
