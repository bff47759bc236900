"""Draft with an independent smaller language model that shares the target's tokenizer.

Leviathan et al. 2023 and Chen et al. 2023 (speculative decoding / sampling with a draft model;
Spec-Bench's SpS). The draft keeps its own KV cache, resynchronised with the committed tokens at
every step by longest common prefix, so it never needs to be told what was rejected.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..engine.cache import full_history_cache
from ..engine.dynamic_tree import TreeSpec, grow_dynamic_tree, node_path, tree_rows_mask
from ..engine.siblings import draw_siblings
from ..engine.target import forward_with_mask
from ..engine.tree import DraftTree
from ..errors import UnsupportedError
from .base import Drafter, DraftRequest, StepOutcome


class DraftModelDrafter(Drafter):
    """Propose ``num_tokens`` tokens autoregressively with ``draft_model``.

    Args:
        draft_model: a causal LM with the target's vocabulary.
        num_tokens: draft length (the starting length when ``schedule="heuristic"``).
        schedule: ``"constant"``, or ``"heuristic"``: +2 after a fully accepted draft, -1 otherwise
            (the schedule transformers uses for assisted generation).
        confidence_threshold: stop drafting early once the draft's probability of its own token
            falls below this (adaptive draft length); ``None`` drafts the full length.
        tree: the tree shape (``hf_spec.engine.dynamic_tree.TREE_SHAPES``). ``"chain"``; ``"static"``:
            each depth also proposes ``top_k - 1`` alternatives (the draft's next best when greedy,
            further draws in the verification rule's sibling scheme when sampling) as leaves beside the
            chain, at no extra draft cost; ``"dynamic"``: an EAGLE-2-style tree of ``num_tokens`` levels,
            ``top_k`` expansions per level and ``tree_budget`` nodes (one draft forward per level, over
            the expanded nodes). With ``top_k`` and ``tree_budget`` it makes ``default_tree_spec``;
            ``generate(tree=..., tree_budget=..., tree_depth=..., tree_top_k=...)`` overrides it for one call.
        top_k: alternatives per depth (default 2 for "static", 4 for "dynamic"); ``top_k > 1`` with
            ``tree="chain"`` means "static".
        tree_budget: nodes kept in a dynamic tree.
        max_num_tokens: upper bound for the heuristic schedule, and for the depth the cost-aware default
            (``draft_length="goodput"``) may choose per step; ``num_tokens`` is then the first step's length.
        draft_vocab: a ``DraftVocabulary`` (VocabTrim / FR-Spec / EAGLE-3's d2t): the draft scores only
            these target tokens (its lm_head rows are sliced once per generate() call), so each draft
            step costs less; draft distributions are exactly zero outside the subset, greedy drafts
            take the subset's argmax, and verification stays exact.
    """

    def __init__(self, draft_model, num_tokens: int = 5, schedule: str = "constant",
                 confidence_threshold: float | None = None, tree: str = "chain", top_k: int | None = None,
                 tree_budget: int = 32, max_num_tokens: int = 16, draft_vocab=None):
        super().__init__()
        if schedule not in ("constant", "heuristic"):
            raise ValueError(f"schedule must be 'constant' or 'heuristic', got {schedule!r}.")
        if num_tokens < 1:
            raise ValueError("num_tokens must be at least 1.")
        if tree == "chain" and top_k is not None and top_k > 1:
            tree = "static"
        self.default_tree_spec = TreeSpec(tree, top_k=top_k or _DEFAULT_TOP_K[tree], budget=tree_budget)
        self.tree_spec = self.default_tree_spec  # this generate() call's
        self.draft_model = draft_model
        self.initial_num_tokens = num_tokens
        self.num_tokens = num_tokens
        self.schedule = schedule
        self.confidence_threshold = confidence_threshold
        self.max_num_tokens = max(max_num_tokens, num_tokens)
        self._cache: DynamicCache | None = None
        self._cached_ids = torch.empty(0, dtype=torch.long)
        self.draft_vocab = draft_vocab
        self._forward_model = draft_model  # the draft model, or its trimmed-vocabulary view (set in begin)

    @classmethod
    def from_pretrained(cls, path_or_id: str, *, dtype: torch.dtype = torch.float32, revision: str | None = None,
                        token: str | bool | None = None, **drafter_kwargs) -> DraftModelDrafter:
        """A draft model from a folder or Hub id (e.g. one distilled with ``recipes/distill_draft.py``), loaded with
        transformers' ``AutoModelForCausalLM`` and wrapped: ``drafter_kwargs`` are the constructor's."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, revision=revision, token=token)
        return cls(model.eval(), **drafter_kwargs)

    def begin(self, target, input_ids, generation_config, logits_processor, sibling_scheme="top_k",
              tree_spec: TreeSpec | None = None) -> None:
        """``tree_spec`` is the ``TreeSpec`` of ``generate(tree=...)``, ``None`` for the constructor's."""
        super().begin(target, input_ids, generation_config, logits_processor, sibling_scheme)
        self.tree_spec = tree_spec or self.default_tree_spec
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
        # Sliding-window layers keep their whole history here (the masks apply the window): a dynamic tree
        # adds several levels to this cache before rolling back, more than a window-sized layer would keep.
        self._cache = full_history_cache(self.draft_model.config)
        self._cached_ids = input_ids.new_empty(0)
        self._forward_model = self._trimmed_view(target_vocab) if self.draft_vocab is not None else self.draft_model

    def propose(self, request: DraftRequest) -> DraftTree:
        ids = request.input_ids[0]
        own_length = self.tree_spec.depth or self.num_tokens
        ceiling = max(own_length, self.max_num_tokens) if request.engine_sets_length else own_length
        length = min(ceiling, request.max_tokens)
        if length == 0:
            return DraftTree.empty(ids.device)
        logits = self._logits_after(ids)
        if self.tree_spec.shape == "dynamic":
            return self._propose_dynamic(request.input_ids, logits, length)
        return self._propose_chain(request.input_ids, logits, length)

    def _propose_chain(self, input_ids: torch.Tensor, logits: torch.Tensor, length: int) -> DraftTree:
        """The chain (plus, for a static tree, alternatives at each depth), one draft forward per depth."""
        ids = input_ids[0]
        sequence = input_ids
        tokens, parents, probs = [], [], []
        chain_parent = -1
        for depth in range(length):
            scores = self.logits_processor(sequence, logits.float()[None])[0]
            distribution = torch.softmax(scores, dim=-1) if self._needs_probs() else None  # once: picking, confidence
            candidates, distributions = self._pick(scores, distribution)
            tokens += candidates
            parents += [chain_parent] * len(candidates)
            probs += distributions
            chain_parent = len(tokens) - len(candidates)
            chain_token = candidates[0]
            sequence = torch.cat([sequence, sequence.new_tensor([[chain_token]])], dim=1)
            threshold = self.confidence_threshold
            confident = threshold is None or float(distribution[chain_token]) >= threshold
            if depth == length - 1 or not confident:
                break
            logits = self._run_draft(sequence[0, -1:])
        draft_probs = None if probs[0] is None else torch.stack(probs)
        return DraftTree(torch.tensor(tokens, device=ids.device), torch.tensor(parents, device=ids.device), draft_probs)

    def observe(self, outcome: StepOutcome) -> None:
        if self.schedule != "heuristic":
            return
        if outcome.num_accepted == max(outcome.tree.depths, default=0):
            self.num_tokens = min(self.num_tokens + 2, self.max_num_tokens)
        else:
            self.num_tokens = max(self.num_tokens - 1, 1)

    # ------------------------------------------------------------------ helpers
    def _siblings(self) -> int:
        return self.tree_spec.top_k if self.tree_spec.shape == "static" else 1

    def _needs_probs(self) -> bool:
        return self.do_sample or self._siblings() > 1 or self.confidence_threshold is not None

    def _pick(
        self, scores: torch.Tensor, distribution: torch.Tensor | None
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """Chain token first, then the alternatives; and the distribution each was drawn from."""
        count = self._siblings()
        if count == 1 and not self.do_sample:
            return [int(scores.argmax())], [None]
        return draw_siblings(distribution, count, self.sibling_scheme)

    def _propose_dynamic(self, input_ids: torch.Tensor, root_logits: torch.Tensor, depth: int) -> DraftTree:
        """EAGLE-2-style growth: each level runs the draft once over the expanded nodes (tree attention)."""
        committed = input_ids.shape[1]
        cache_row: dict[int, int] = {}

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            if frontier == [-1]:
                logits = root_logits[None]
            else:
                logits = self._run_draft_on_nodes(frontier, tokens, parents, cache_row, committed)
            paths = [node_path(node, tokens, parents) for node in frontier]
            sequences = torch.cat([input_ids.expand(len(frontier), -1), input_ids.new_tensor(paths)], dim=1)
            return torch.log_softmax(self.logits_processor(sequences, logits.float()), dim=-1)

        tree = grow_dynamic_tree(expand, depth, self.tree_spec.top_k, self.tree_spec.budget, input_ids.device)
        self._cache.crop(committed - self._cache.get_seq_length())
        self._cached_ids = input_ids[0]
        return tree

    def _run_draft_on_nodes(self, nodes: list[int], tokens: list[int], parents: list[int],
                            cache_row: dict[int, int], committed: int) -> torch.Tensor:
        allowed, depths = tree_rows_mask(nodes, parents, cache_row, self._cache.get_seq_length(), committed)
        device = self._cached_ids.device
        node_tokens = torch.tensor([[tokens[node] for node in nodes]], device=device)
        positions = committed - 1 + torch.tensor([depths], device=device)
        outputs = forward_with_mask(self._forward_model, self._cache, node_tokens, positions, allowed.to(device))
        return outputs.logits[0]

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
        outputs = self._forward_model(input_ids=new_ids[None], past_key_values=self._cache, use_cache=True,
                                      logits_to_keep=1)
        self._cached_ids = torch.cat([self._cached_ids, new_ids])
        return outputs.logits[0, -1]

    def _trimmed_view(self, target_vocab: int):
        from .draft_vocab import TrimmedOutputModel

        if self.draft_vocab.target_vocab_size != target_vocab:
            raise UnsupportedError(
                f"The draft vocabulary maps a {self.draft_vocab.target_vocab_size}-token vocabulary but the target "
                f"has {target_vocab} logits; select the draft vocabulary from this target's outputs."
            )
        return TrimmedOutputModel(self.draft_model, self.draft_vocab)

    def __repr__(self) -> str:
        return (f"DraftModelDrafter({type(self.draft_model).__name__}, num_tokens={self.initial_num_tokens}, "
                f"schedule={self.schedule!r}, tree={self.default_tree_spec.shape!r})")


_DEFAULT_TOP_K = {"chain": 1, "static": 2, "dynamic": 4}

