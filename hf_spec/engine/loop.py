"""The speculative decoding loop, in the shape of a transformers ``custom_generate`` callable.

One step: the drafter proposes a tree below the last committed token; the target runs once over
the root and every draft node (and the rows a drafter appends, e.g. gated-LoRA MTP's mask tokens,
``hf_spec.engine.appended_rows``); a verification rule walks the tree with the target's processed
distributions; the cache keeps the accepted path; the accepted tokens plus one target token are
committed one by one through the stopping criteria and the streamer, as plain decoding would.
"""

from __future__ import annotations

import time

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .drafter import DraftRequest, Drafter, StepOutcome
from .features import resolve_layers
from ..errors import UnsupportedError
from .cache import check_cache_supported, keep_block_rows
from .processors import TreeLogitsProcessor
from .target import forward_tree, prefill, process_block_scores
from .dynamic_tree import TreeSpec
from .goodput import CostCurve, GoodputPolicy, measured_cost_curve, resolve_draft_length
from .rules import RULES, VerificationRule

# Architectures whose tree attention (4D mask + position ids through the public forward) is tested.
SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "gemma3_text"}
_FORWARD_KWARGS_WE_REBUILD = {"attention_mask", "position_ids", "past_key_values", "use_cache",
                              "logits_to_keep", "cache_position"}


def allow_model_type(model_type: str) -> None:
    """Opt an untested decoder-only architecture in (its forward must accept 4D masks and position ids)."""
    SUPPORTED_MODEL_TYPES.add(model_type)


def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    drafter: Drafter | None = None,
    verification: str = "auto",
    tree: str | None = None,
    tree_budget: int | None = None,
    tree_depth: int | None = None,
    tree_top_k: int | None = None,
    draft_length: str | None = None,
    cost_curve: CostCurve | None = None,
    hf_spec_streamer=None,
    **model_kwargs,
):
    """Speculative decoding with ``drafter``; use as ``model.generate(custom_generate=speculative_generate, drafter=...)``.

    After ``import hf_spec``, ``model.generate(assistant_model=drafter)`` routes here too; both entry
    points pass through ``hf_spec.integration``, which hands the streamer over as ``hf_spec_streamer``
    and turns stop strings into a stopping criterion (transformers gives neither to a callable).

    ``verification`` is ``"auto"`` (``"greedy"`` when
    ``do_sample=False``, ``"rrs"`` otherwise) or a name in ``hf_spec.engine.rules.RULES``:
    ``"greedy"``, ``"rrs"``, ``"rrs_without_replacement"``, ``"spechub"``, or the lossy ``"typical"``.
    ``tree`` (``"chain"``, ``"static"`` or ``"dynamic"``) with ``tree_budget``, ``tree_depth`` and
    ``tree_top_k`` reshapes the drafter's trees for this call (drafters that grow trees only).
    ``draft_length="goodput"`` (the default, ``hf_spec.engine.goodput.DEFAULT_DRAFT_LENGTH``) caps each step's draft
    depth where expected tokens per second peak, from
    the target's cost curve (``cost_curve``, a ``hf_spec.CostCurve``; measured once per model when not given) and
    running acceptance (``hf_spec.engine.goodput``); ``"fixed"`` drafts the drafter's own length every step.
    Per-call statistics land in ``drafter.stats``.
    """
    rule = _choose_verification(verification, generation_config)
    draft_length = resolve_draft_length(draft_length, cost_curve)
    _check_request(model, input_ids, generation_config, drafter, model_kwargs)
    logits_processor = TreeLogitsProcessor(logits_processor)
    cache = model_kwargs["past_key_values"]
    check_cache_supported(cache)
    tree_spec = _tree_spec(tree, tree_budget, tree_depth, tree_top_k)
    drafter.begin(model, input_ids, generation_config, logits_processor, sibling_scheme=rule.sibling_scheme,
                  **({"tree_spec": tree_spec} if tree_spec else {}))
    stats = drafter.stats
    streamer = hf_spec_streamer
    if streamer is not None:
        streamer.put(input_ids.cpu())

    keep_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    keep_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores, raw_logits = [], []
    features = resolve_layers(model, drafter.target_features)
    new_features = prefill(model, cache, input_ids, features)
    policy = None
    if draft_length == "goodput":
        policy = GoodputPolicy(cost_curve or measured_cost_curve(model, cache, input_ids[0, -1]))

    finished = False
    with ForwardTimer(model) as target_time:
        while not finished:
            step_start = time.perf_counter()
            remaining = generation_config.max_length - input_ids.shape[1]
            max_tokens = max(remaining - 1, 0)
            engine_sets_length = policy is not None and policy.has_estimates
            if policy is not None:
                max_tokens = policy.depth_cap(max_tokens)
            tree = drafter.propose(DraftRequest(input_ids, max_tokens, new_features, engine_sets_length))
            drafted = time.perf_counter()
            block_start = cache.get_seq_length()
            appended = drafter.appended_rows(tree, policy.drafts_next_step() if policy is not None else True)
            forward = forward_tree(model, cache, input_ids[0, -1], tree, features, appended)
            block_scores = process_block_scores(logits_processor, input_ids, tree, forward.logits)
            verdict = rule.verify(tree, block_scores)

            new_tokens = [tree.token_list[node] for node in verdict.accepted_nodes] + [verdict.next_token]
            committed = input_ids.shape[1]
            extended = torch.cat([input_ids, input_ids.new_tensor([new_tokens])], dim=1)  # one copy per step
            emitted = 0
            for token, row in zip(new_tokens, verdict.block_rows):
                emitted += 1
                input_ids = extended[:, : committed + emitted]  # a view for the stopping criteria
                if keep_scores:
                    # owned: a view would keep the whole block alive
                    scores.append(block_scores[row : row + 1].clone())
                if keep_logits:
                    raw_logits.append(forward.logits[row : row + 1].to(torch.float32, copy=True))
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
                if stopping_criteria(input_ids, block_scores[row : row + 1]).any():
                    finished = True
                    break
            # As in plain decoding, the cache holds every committed token but the last one.
            kept_rows = verdict.block_rows[:emitted]
            keep_block_rows(cache, block_start, kept_rows)
            accepted = verdict.accepted_nodes[:emitted]
            drafter.observe(StepOutcome(tree, accepted, verdict.next_token if emitted > len(accepted) else None))
            stats.record_step(tree.num_nodes, len(accepted), emitted)
            if features:
                new_features = forward.features[:, kept_rows]
            target_seconds = target_time.take()
            stats.record_time(drafted - step_start, target_seconds, time.perf_counter() - step_start)
            if policy is not None:
                policy.record(max(tree.depths, default=0), tree.num_nodes, len(verdict.accepted_nodes),
                              target_seconds, drafted - step_start, appended.count if appended else 0)
                stats.record_depth_cap(max_tokens)

    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=input_ids,
            scores=tuple(scores) if keep_scores else None,
            logits=tuple(raw_logits) if keep_logits else None,
            past_key_values=cache,
        )
    return input_ids


class ForwardTimer:
    """Seconds spent inside ``model``'s forwards since the last ``take()`` (a pre- and a post-forward hook)."""

    def __init__(self, model):
        self.seconds, self._start = 0.0, 0.0
        self._handles = [model.register_forward_pre_hook(self._begin), model.register_forward_hook(self._end)]

    def _begin(self, module, args) -> None:
        self._start = time.perf_counter()

    def _end(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._start

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def __enter__(self) -> ForwardTimer:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def _choose_verification(verification: str, generation_config) -> VerificationRule:
    sampling = bool(generation_config.do_sample)
    if verification == "auto":
        verification = "rrs" if sampling else "greedy"
    if verification not in RULES:
        raise UnsupportedError(f"Unknown verification={verification!r}; choose 'auto' or one of {sorted(RULES)}.")
    rule = RULES[verification]
    if rule.sampling != sampling:
        needed = "do_sample=True" if rule.sampling else "do_sample=False"
        raise UnsupportedError(
            f"verification={verification!r} needs {needed}: a greedy rule under sampling would not follow the "
            "target's distribution, and a sampling rule cannot reproduce greedy decoding. Use verification='auto'."
        )
    return rule


def _tree_spec(tree, budget, depth, top_k) -> TreeSpec | None:
    if tree is None:
        if (budget, depth, top_k) != (None, None, None):
            raise UnsupportedError("tree_budget / tree_depth / tree_top_k need tree='static' or tree='dynamic'.")
        return None
    defaults = TreeSpec()
    return TreeSpec(tree, depth=depth, top_k=top_k or {"chain": 1, "static": 2}.get(tree, defaults.top_k),
                    budget=budget or defaults.budget)


def _check_request(model, input_ids, generation_config, drafter, model_kwargs) -> None:
    if not isinstance(drafter, Drafter):
        raise UnsupportedError(
            "speculative_generate needs `drafter=` an hf_spec Drafter (e.g. hf_spec.PromptLookupDrafter()), "
            f"got {type(drafter).__name__}."
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedError("hf_spec supports decoder-only models; encoder-decoder models are not supported.")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedError(
            f"Model type {config.model_type!r} is not validated with hf_spec's tree attention (supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}). If its forward accepts a 4D attention mask and position ids, "
            f"opt in with hf_spec.allow_model_type({config.model_type!r}); otherwise use plain generate()."
        )
    if generation_config.num_beams > 1 or generation_config.num_return_sequences > 1:
        raise UnsupportedError("hf_spec does not support beam search or num_return_sequences > 1.")
    if input_ids.shape[0] != 1:
        raise UnsupportedError(
            f"hf_spec decodes one sequence at a time for now (got batch size {input_ids.shape[0]}); "
            "call generate() per prompt, or use plain generate() for batches."
        )
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise UnsupportedError(
            "hf_spec cannot return attentions or hidden states (the target runs on whole draft trees); "
            "drop output_attentions / output_hidden_states."
        )
    if not generation_config.use_cache:
        raise UnsupportedError("Speculative decoding needs the KV cache; remove use_cache=False.")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise UnsupportedError("hf_spec does not support padded inputs (attention_mask with zeros) yet.")
    unexpected = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _FORWARD_KWARGS_WE_REBUILD)
    if unexpected:
        raise UnsupportedError(f"hf_spec does not support these model inputs: {unexpected}.")
