"""``hf-spec demo`` (``make demo``): the benchmark run with its ``demo`` preset, as a function.

The demo is no separate harness: ``run_demo`` is ``hf_spec.bench.run_bench`` with the settings of
``hf_spec.bench.presets.DEMO`` (the same method registry, measurement loop, identity check and
environment record as ``hf-spec bench``), printing the demo's compact table.

    from hf_spec.demo import run_demo
    result = run_demo(target="hf_spec:qwen2.5-coder-1.5b-instruct", draft="hf_spec:qwen2.5-coder-0.5b-instruct")
"""

from __future__ import annotations

from .bench import BenchResult, load_tasks, make_config, run_bench
from .bench.presets import DEMO


def demo_prompts() -> list[str]:
    """The user turns the demo measures (input-grounded: code editing, extraction, summarization)."""
    return [prompt.turns[0] for prompt in load_tasks(DEMO["tasks"], DEMO["limit"])]


def run_demo(config_path: str | None = None, **settings) -> BenchResult:
    """Run the demo; ``settings`` are ``BenchConfig`` fields that replace the preset's (``None`` keeps them)."""
    return run_bench(make_config(config_path, preset="demo", **settings))

