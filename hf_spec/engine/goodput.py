"""Cost-aware draft length: each step drafts as deep as maximizes expected tokens per second.

SmartSpec (Liu et al. 2024, "Optimizing Speculative Decoding for Serving Large Language Models Using Goodput")
chooses the speculation length from the expected accepted tokens and the measured cost of a verification batch;
llama.cpp keeps per-batch cost tables to the same end. Here, per step, for a depth cap ``D``:

    tokens(D) = 1 + sum_{d <= D} prod_{j <= d} alpha_j        (alpha_j: P(depth j accepted | depth j - 1 was))
    seconds(D) = t(1) * c((1 + nodes_per_level * D) * (1 + appended_per_row)) + draft_seconds_per_level * D

and the engine passes ``argmax tokens(D) / seconds(D)`` to the drafter as ``DraftRequest.max_tokens``. A step
that drafts nothing (``D = 0``) is a plain one-row forward: a drafter that prepares the next step's drafts inside
this step's forward (appended rows) does so only when the policy expects the next step to draft
(``drafts_next_step``: this step drafts, or a probe is due next). ``c(k)`` is the
target's cost curve (``CostCurve``: measured once per model, backend and thread count on the live KV cache, or given);
``t(1)``, the drafter's cost per level, its nodes per level, the rows it appends to the verification forward per
block row (gated-LoRA MTP's mask blocks, ``hf_spec.engine.appended_rows``; 0 for other drafters) and the ``alpha_j``
are running estimates over recent steps
(exponential forgetting; ``alpha_j`` counts only steps whose tree reached depth ``j``). When no depth pays (``D = 0``:
a plain decoding step), a step still drafts after ``probe_every`` such steps, so the estimates can recover; each probe
that gets nothing accepted doubles that interval (up to ``max_probe_every``), an accepted one resets it, so a drafter
that is never right costs ever less.

The depth never depends on the current step's draft or the target's randomness in it, so verification stays
lossless whatever the policy chooses.
"""

from __future__ import annotations

import time
import weakref

import torch

from ..errors import UnsupportedError
from .cache import keep_block_rows
from .target import forward_with_mask

DRAFT_LENGTHS = ("goodput", "fixed")
DEFAULT_DRAFT_LENGTH = "goodput"  # what generate() uses when draft_length is not given
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32)


class CostCurve:
    """``c(k) = t(k) / t(1)``: the cost of a target forward over ``k`` new tokens against a one-token forward.

    Built from measured ratios ``{k: c(k)}`` (``k = 1`` included); linear between measured ``k`` and beyond the last
    one along the last segment (never below the last ratio).
    """

    def __init__(self, ratios: dict[int, float]):
        ratios = {int(k): float(v) for k, v in ratios.items()}
        if 1 not in ratios or len(ratios) < 2 or any(k < 1 or v <= 0 for k, v in ratios.items()):
            raise UnsupportedError(
                f"A cost curve needs positive ratios for k = 1 and at least one larger k, got {ratios}; measure one "
                "with `hf-spec cost` or leave cost_curve unset to measure it on the fly.")
        one = ratios[1]
        self.ratios = {k: ratios[k] / one for k in sorted(ratios)}

    @classmethod
    def from_results(cls, curve: dict, context: int | None = None) -> CostCurve:
        """From ``hf_spec.bench.cost.cost_curve``'s result (``results.json``'s ``cost_curve``): the ratios at
        ``context`` cached tokens (default: the first context measured)."""
        contexts = {int(key): value for key, value in curve["contexts"].items()}
        return cls(contexts[context if context is not None else next(iter(contexts))]["ratio"])

    def __call__(self, rows: float) -> float:
        ks = list(self.ratios)
        rows = max(float(rows), 1.0)
        for low, high in zip(ks, ks[1:]):
            if rows <= high:
                return self._between(low, high, rows)
        return max(self._between(ks[-2], ks[-1], rows), self.ratios[ks[-1]])

    def _between(self, low: int, high: int, rows: float) -> float:
        share = (rows - low) / (high - low)
        return self.ratios[low] + share * (self.ratios[high] - self.ratios[low])

    def __repr__(self) -> str:
        return "CostCurve({" + ", ".join(f"{k}: {v:.2f}" for k, v in self.ratios.items()) + "})"


_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def measured_cost_curve(model, cache, root_token: torch.Tensor, repeats: int = 3) -> CostCurve:
    """The target's cost curve on the live cache (the rows written are rolled back), measured once per model, CPU
    backend (``hf_spec.accelerate_for_cpu`` changes it), device and thread count, then reused. Each point is the
    fastest of ``repeats`` forwards: interference (another process, a page fault) only ever adds time, and one
    disturbed point would otherwise steer every later call."""
    from ..cpu_fast_path import cpu_backend  # the fast path imports the engine's neighbours, not the reverse

    device = root_token.device
    key = (cpu_backend(model), str(device), torch.get_num_threads())
    known = _MEASURED.setdefault(model, {})
    if key not in known:
        known[key] = CostCurve({k: _forward_seconds(model, cache, root_token, k, repeats) for k in CALIBRATION_ROWS})
    return known[key]


@torch.no_grad()
def _forward_seconds(model, cache, root_token: torch.Tensor, rows: int, repeats: int) -> float:
    start = cache.get_seq_length()
    tokens = root_token.view(1, 1).expand(1, rows)
    positions = torch.arange(start, start + rows, device=root_token.device)
    times = []
    for _ in range(repeats + 1):  # the first forward of a shape warms it up and is not counted
        began = time.perf_counter()
        forward_with_mask(model, cache, tokens, positions[None], None)  # as verification runs it: every row's logits
        if root_token.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        keep_block_rows(cache, start, [])
    return min(times[1:])


class GoodputPolicy:
    """Chooses each step's depth cap from the cost curve and running acceptance and timing estimates."""

    def __init__(self, curve: CostCurve, prior_acceptance: float = 0.6, prior_strength: float = 2.0,
                 memory: float = 0.95, probe_every: int = 8, max_probe_every: int = 64):
        self.curve = curve
        self.prior_acceptance, self.prior_strength = prior_acceptance, prior_strength
        self.memory, self.probe_every, self.max_probe_every = memory, probe_every, max_probe_every
        self._probe_interval = probe_every
        self._probing = False
        self.reached: list[float] = []  # reached[j - 1]: (decayed) steps whose tree reached depth j with j - 1 accepted
        self.accepted: list[float] = []  # accepted[j - 1]: of those, the steps that accepted depth j
        self.one_token_seconds: float | None = None
        self.draft_seconds_per_level: float | None = None
        self._steps = 0
        self.nodes_per_level = 1.0
        self.appended_per_row: float | None = None  # over the steps that appended rows
        self.deepest = 0
        self._plain_steps = 0
        self._last_cap: int | None = None

    @property
    def has_estimates(self) -> bool:
        """Whether a step has been measured (before that, the drafter drafts its own length)."""
        return self.one_token_seconds is not None

    def depth_cap(self, limit: int) -> int:
        """The depth to draft this step, at most ``limit``; the first step (nothing measured yet) drafts freely."""
        self._last_cap = self._choose_depth(limit)
        return self._last_cap

    def drafts_next_step(self) -> bool:
        """Whether the next step is expected to draft: this step's cap is positive, or a probe is due next. A
        drafter that prepares the next step's drafts in this step's forward (``Drafter.appended_rows``) skips that
        work when not, so a drafter that does not pay costs a plain step."""
        return self._last_cap is None or self._last_cap > 0 or self._plain_steps + 1 >= self._probe_interval

    def _choose_depth(self, limit: int) -> int:
        if not self.has_estimates:
            return limit
        deepest = min(self.deepest + 1, limit)
        tokens = self._expected_tokens_up_to(deepest)  # one pass over the levels, shared by every candidate depth
        rates = [tokens[depth] / self.step_seconds(depth) for depth in range(deepest + 1)]
        best = max(range(deepest + 1), key=lambda depth: (rates[depth], -depth))
        if best == 0 and limit > 0:
            self._plain_steps += 1
            if self._plain_steps >= self._probe_interval:
                self._plain_steps = 0
                self._probing = True
                best = max(range(1, deepest + 1), key=lambda depth: (rates[depth], -depth))
        return best

    def expected_tokens(self, depth: int) -> float:
        """``1 + sum_{d <= depth} P(the first d draft levels are accepted)``."""
        return self._expected_tokens_up_to(depth)[depth]

    def acceptance(self, depth: int) -> float:
        """Running estimate of P(depth accepted | depth - 1 accepted), shrunk towards the estimate one level up.

        Shrinking towards the shallower level (not a fixed prior) keeps a depth the policy stopped drafting from
        looking worse than the evidence says: its counts decay while it is not drafted, and a fixed pessimistic
        prior would then lock the draft at the shallower depth for good."""
        return self._acceptances(depth)[depth - 1]

    def _acceptances(self, depth: int) -> list[float]:
        """``[acceptance(1), ..., acceptance(depth)]``, each level's estimate the next one's prior."""
        estimates, prior = [], self.prior_acceptance
        for level in range(depth):
            reached = self.reached[level] if level < len(self.reached) else 0.0
            accepted = self.accepted[level] if level < len(self.accepted) else 0.0
            prior = (accepted + self.prior_strength * prior) / (reached + self.prior_strength)
            estimates.append(prior)
        return estimates

    def _expected_tokens_up_to(self, depth: int) -> list[float]:
        """``[expected_tokens(0), ..., expected_tokens(depth)]``."""
        totals, reach = [1.0], 1.0
        for alpha in self._acceptances(depth):
            reach *= alpha
            totals.append(totals[-1] + reach)
        return totals

    def step_seconds(self, depth: int) -> float:
        appended_per_row = (self.appended_per_row or 0.0) if depth else 0.0  # no draft: a plain step
        rows = (1 + self.nodes_per_level * depth) * (1 + appended_per_row)
        return self.one_token_seconds * self.curve(rows) + (self.draft_seconds_per_level or 0.0) * depth

    def record(self, depth: int, nodes: int, accepted: int, target_seconds: float, draft_seconds: float,
               appended: int = 0) -> None:
        """One verified step: its tree's depth and node count, the accepted draft tokens, the time spent, and the
        rows the drafter appended to the verification forward."""
        self.deepest = max(self.deepest, depth)
        if self._probing:
            self._probing = False
            failed = accepted == 0
            self._probe_interval = min(2 * self._probe_interval, self.max_probe_every) if failed else self.probe_every
        self._forget()
        while len(self.reached) < depth:
            self.reached.append(0.0)
            self.accepted.append(0.0)
        for level in range(1, min(depth, accepted + 1) + 1):
            self.reached[level - 1] += 1
            self.accepted[level - 1] += level <= accepted
        one_token = target_seconds / self.curve(1 + nodes + appended)
        self.one_token_seconds = self._average(self.one_token_seconds, one_token)
        if appended:
            self.appended_per_row = self._average(self.appended_per_row, appended / (1 + nodes))
        self._steps += 1
        if depth:
            self.nodes_per_level = self._average(self.nodes_per_level, nodes / depth)
            if self._steps > 1:  # the first step's draft time includes the drafter's own prefill of the prompt
                self.draft_seconds_per_level = self._average(self.draft_seconds_per_level, draft_seconds / depth)

    def _forget(self) -> None:
        self.reached = [count * self.memory for count in self.reached]
        self.accepted = [count * self.memory for count in self.accepted]

    def _average(self, running: float | None, value: float) -> float:
        return value if running is None else self.memory * running + (1 - self.memory) * value


def resolve_draft_length(draft_length: str | None, cost_curve) -> str:
    """``draft_length`` checked, ``None`` meaning ``DEFAULT_DRAFT_LENGTH``."""
    draft_length = DEFAULT_DRAFT_LENGTH if draft_length is None else draft_length
    if draft_length not in DRAFT_LENGTHS:
        raise UnsupportedError(f"draft_length must be one of {DRAFT_LENGTHS}, got {draft_length!r}: 'goodput' "
                               "chooses each step's depth from the cost curve, 'fixed' drafts the drafter's own "
                               "length.")
    if cost_curve is not None and draft_length != "goodput":
        raise UnsupportedError("cost_curve= only applies with draft_length='goodput'.")
    return draft_length
