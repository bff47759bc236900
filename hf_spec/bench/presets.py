"""Named settings of ``hf-spec bench``: ``--preset quick`` and ``--preset demo`` (= ``hf-spec demo``, ``make demo``).

A preset is a set of ``BenchConfig`` fields applied over the defaults and under a YAML file and flags.

``demo`` answers "does speculative decoding pay here?" in about three minutes on a 2-core CPU: the best
drafters hf_spec has for the target against plain ``generate()`` and transformers' own prompt lookup,
on prompts where drafting can pay. Spec-Bench (Xia et al. 2024) shows retrieval drafters winning on
input-grounded tasks, so the demo asks for code editing, extraction and summarization over texts in
the prompt (one prompt each), with moderate answers, the median of three interleaved repetitions and
explicit threads. It has its own compact table; the full per-task-group tables are ``hf-spec bench``.
"""

from __future__ import annotations

import os

QUICK = {"limit": 1, "max_new_tokens": 20, "repeats": 2, "warmup": 1}  # about five minutes for SmolLM2-135M on 2 cores

DEMO_LABELS = {
    "plain": "plain generate()",
    "transformers_prompt_lookup": "transformers prompt lookup",
    "transformers_assisted": "transformers assisted generation (draft model)",
    "PromptLookupDrafter": "hf_spec prompt lookup (chain)",
    "hf_spec_eagle3_trained": "hf_spec EAGLE-3 draft (trained, committed)",
    "DraftModelDrafter": "hf_spec draft model (chain)",
    "hf_spec_draft_adaptive": "hf_spec draft model (adaptive length)",
}

DEMO = {
    "tasks": ["code_edit", "extraction", "summarization"],
    "limit": 1,
    "max_new_tokens": 32,
    "repeats": 3,
    "warmup": 1,
    "threads": min(2, os.cpu_count() or 1),
    "early_exit_layers": None,  # no early-exit draft: it is a slowdown (see the README); --draft adds a real one
    "methods": list(DEMO_LABELS),
    "labels": DEMO_LABELS,
    "table": "demo",
    "out": "outputs/demo",
}

PRESETS: dict[str, dict] = {"quick": QUICK, "demo": DEMO}
