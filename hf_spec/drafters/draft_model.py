"""Draft with an independent smaller language model that shares the target's tokenizer.

Leviathan et al. 2023 and Chen et al. 2023 (speculative decoding / sampling with a draft model;
Spec-Bench's SpS). The draft keeps its own KV cache, resynchronised with the committed tokens at
every step by longest common prefix, so it never needs to be told what was rejected.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..engine.cache import check_cache_supported
from ..engine.tree import DraftTree
from ..errors import UnsupportedError
from .base import DraftRequest, Drafter


class DraftModelDrafter(Drafter):
    """Propose ``num_tokens`` tokens autoregressively with ``draft_model``.

    Args:
        draft_model: a causal LM with the target's vocabulary.
        num_tokens: draft length (the starting length when ``schedule="heuristic"``).
        schedule: ``"constant"``, or ``"heuristic"``: +2 after a fully accepted draft, -1 otherwise
            (the schedule transformers uses for assisted generation).
        confidence_threshold: stop drafting early once the draft's probability of its own token
            falls below this (adaptive draft length); ``None`` drafts the full length.
        top_k: with ``top_k > 1`` each depth also proposes ``top_k - 1`` alternative tokens (the
            draft's next best when greedy, further samples when sampling) as leaves beside the main
            chain: a top-k tree verified in one forward, at no extra draft cost.
        max_num_tokens: upper bound for the heuristic schedule.
    """

    def __init__(self, draft_model, num_tokens: int = 5, schedule: str = "constant",
                 confidence_threshold: float | None = None, top_k: int = 1, max_num_tokens: int = 16):
        super().__init__()
        if schedule not in ("constant", "heuristic"):
            raise ValueError(f"schedule must be 'constant' or 'heuristic', got {schedule!r}.")
        if num_tokens < 1 or top_k < 1:
            raise ValueError("num_tokens and top_k must be at least 1.")
        self.draft_model = draft_model
        self.initial_num_tokens = num_tokens
        self.num_tokens = num_tokens
        self.schedule = schedule
        self.confidence_threshold = confidence_threshold
        self.top_k = top_k
        self.max_num_tokens = max(max_num_tokens, num_tokens)
        self._cache: DynamicCache | None = None
        self._cached_ids = torch.empty(0, dtype=torch.long)

    def begin(self, target, input_ids, generation_config, logits_processor) -> None:
        super().begin(target, input_ids, generation_config, logits_processor)
        target_vocab = target.get_output_embeddings().weight.shape[0]
        draft_vocab = self.draft_model.get_output_embeddings().weight.shape[0]
        if target_vocab != draft_vocab:
            raise UnsupportedError(
                f"The draft model's vocabulary ({draft_vocab} logits) differs from the target's ({target_vocab}). "
                "DraftModelDrafter needs the same tokenizer and vocabulary; for a draft with another "
                "tokenizer use transformers' own assisted generation with assistant_tokenizer=..."
            )
        if self.draft_model.device != target.device:
            raise UnsupportedError(
                f"The draft model is on {self.draft_model.device} and the target on {target.device}; "
                "move them to the same device."
            )
        self.num_tokens = self.initial_num_tokens
        self._cache = DynamicCache(config=self.draft_model.config)
        check_cache_supported(self._cache, generation_config.max_length + self.max_num_tokens)
        self._cached_ids = input_ids.new_empty(0)

    def propose(self, request: DraftRequest) -> DraftTree:
        ids = request.input_ids[0]
        length = min(self.num_tokens, request.max_tokens)
        if length == 0:
            return DraftTree.empty(ids.device)
        logits = self._logits_after(ids)
        sequence = request.input_ids
        tokens, parents, probs = [], [], []
        chain_parent = -1
        for depth in range(length):
            scores = self.logits_processor(sequence, logits.float()[None])[0]
            candidates, distribution = self._pick(scores)
            for rank, token in enumerate(candidates):
                tokens.append(token)
                parents.append(chain_parent)
                probs.append(distribution)
            chain_parent = len(tokens) - len(candidates)
            chain_token = candidates[0]
            sequence = torch.cat([sequence, sequence.new_tensor([[chain_token]])], dim=1)
            confident = self._confidence(scores, chain_token) >= (self.confidence_threshold or 0.0)
            if depth == length - 1 or not confident:
                break
            logits = self._run_draft(sequence[0, -1:])
        draft_probs = torch.stack(probs) if self.do_sample else None
        return DraftTree(torch.tensor(tokens, device=ids.device), torch.tensor(parents, device=ids.device), draft_probs)

    def observe(self, tree: DraftTree, num_accepted: int) -> None:
        if self.schedule != "heuristic":
            return
        if num_accepted == max(tree.depths, default=0):
            self.num_tokens = min(self.num_tokens + 2, self.max_num_tokens)
        else:
            self.num_tokens = max(self.num_tokens - 1, 1)

    # ------------------------------------------------------------------ helpers
    def _pick(self, scores: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """Chain token first, then the alternatives; and the distribution they were drawn from."""
        if not self.do_sample:
            return scores.topk(self.top_k).indices.tolist(), None
        distribution = torch.softmax(scores, dim=-1)
        return torch.multinomial(distribution, self.top_k, replacement=True).tolist(), distribution

    def _confidence(self, scores: torch.Tensor, token: int) -> float:
        if self.confidence_threshold is None:
            return 1.0
        return float(torch.softmax(scores, dim=-1)[token])

    def _logits_after(self, ids: torch.Tensor) -> torch.Tensor:
        """Bring the draft cache in line with the committed ``ids`` and return the next-token logits."""
        cached = self._cached_ids
        common = min(cached.shape[0], ids.shape[0] - 1)
        mismatch = (cached[:common] != ids[:common]).nonzero()
        if mismatch.numel():
            common = int(mismatch[0])
        if self._cache.get_seq_length() > common:
            self._cache.crop(common - self._cache.get_seq_length())
        self._cached_ids = ids[:common]
        return self._run_draft(ids[common:])

    def _run_draft(self, new_ids: torch.Tensor) -> torch.Tensor:
        outputs = self.draft_model(input_ids=new_ids[None], past_key_values=self._cache, use_cache=True,
                                   logits_to_keep=1)
        self._cached_ids = torch.cat([self._cached_ids, new_ids])
        return outputs.logits[0, -1]

    def __repr__(self) -> str:
        return (f"DraftModelDrafter({type(self.draft_model).__name__}, num_tokens={self.initial_num_tokens}, "
                f"schedule={self.schedule!r}, top_k={self.top_k})")
