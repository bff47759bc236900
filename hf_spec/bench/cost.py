"""The target's cost curve: how much a forward over ``k`` new tokens costs against a one-token forward.

Speculation pays when ``tau / c(k)`` beats 1 per drafted step (SmartSpec, Liu et al. 2024, calls the product
goodput; llama.cpp keeps per-batch cost tables to the same end). ``c(k) = t(k) / t(1)``, where ``t(k)`` is the median
wall time of one forward of ``k`` new tokens after ``context`` cached ones, the KV cache rolled back after each
forward so every measurement sees the same context. ``hf-spec cost`` writes the curve of each backend (torch's default
kernels, then ``hf_spec.accelerate_for_cpu``'s) into ``results.json``; the bench header shows it for the run's target.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..cpu_fast_path import cpu_backend
from ..engine.cache import full_history_cache, keep_block_rows

DEFAULT_NEW_TOKENS = (1, 2, 4, 8, 16, 32)
DEFAULT_CONTEXTS = (128, 512)


@torch.no_grad()
def forward_seconds(model, context: int, new_tokens: int, repeats: int, seed: int = 0) -> float:
    """Median seconds of one forward of ``new_tokens`` tokens after ``context`` cached random tokens."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    prompt = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    cache = full_history_cache(model.config)
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    block = torch.randint(0, vocab, (1, new_tokens), generator=generator).to(device)
    positions = torch.arange(context, context + new_tokens, device=device)
    times = []
    for _ in range(repeats + 1):  # the first forward warms this shape up and is not counted
        start = time.perf_counter()
        model(input_ids=block, past_key_values=cache, use_cache=True, cache_position=positions)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        keep_block_rows(cache, context, [])
    return statistics.median(times[1:])


def cost_curve(model, contexts=DEFAULT_CONTEXTS, new_tokens=DEFAULT_NEW_TOKENS, repeats: int = 5) -> dict:
    """``{"backend", "contexts": {context: {"seconds": {k: t(k)}, "ratio": {k: c(k)}}}}`` for ``model`` as it is
    (``backend``: ``"default"``, or the fast path ``hf_spec.accelerate_for_cpu`` applied to it)."""
    if 1 not in new_tokens:
        raise ValueError("The cost curve is relative to a one-token forward: new_tokens must include 1.")
    curve = {}
    for context in contexts:
        seconds = {k: forward_seconds(model, context, k, repeats) for k in sorted(new_tokens)}
        curve[context] = {"seconds": seconds, "ratio": {k: value / seconds[1] for k, value in seconds.items()}}
    return {"backend": cpu_backend(model), "repeats": repeats, "contexts": curve}


def curve_line(curve: dict) -> str:
    """One line for a report: ``c(k)/c(1) after N cached tokens: k=2 1.61, ...`` per context."""
    parts = []
    for context, values in curve["contexts"].items():
        ratios = ", ".join(f"k={k} {ratio:.2f}" for k, ratio in values["ratio"].items() if k != 1)
        parts.append(f"after {context} cached tokens: {ratios} (k=1: {1000 * values['seconds'][1]:.1f} ms)")
    return f"target forward cost c(k)/c(1), {curve['backend']} kernels, " + "; ".join(parts)


def markdown(curve: dict, header: str) -> str:
    contexts = list(curve["contexts"])
    ks = list(curve["contexts"][contexts[0]]["ratio"])
    lines = [header, "", "| cached tokens | t(1), ms | " + " | ".join(f"c({k})" for k in ks[1:]) + " |",
             "|---:|---:|" + "---:|" * (len(ks) - 1)]
    for context in contexts:
        values = curve["contexts"][context]
        lines.append(f"| {context} | {1000 * values['seconds'][1]:.1f} | "
                     + " | ".join(f"{values['ratio'][k]:.2f}" for k in ks[1:]) + " |")
    return "\n".join(lines) + "\n"
