"""``hf-spec bench``: a Spec-Bench-style harness (Xia et al. 2024, "Unlocking Efficiency in Large Language
Model Inference: A Comprehensive Survey of Speculative Decoding").

Every hf_spec drafter and verification rule is measured against plain ``generate()`` and against
transformers' own assisted generation and prompt lookup, on the same prompts, in the same run, and
reported as Spec-Bench does: wall-clock speedup over plain decoding and mean accepted tokens per
target forward, per task group. The modules, in the order a run uses them:

- ``config``, ``presets``: settings (defaults, a preset such as ``quick`` or ``demo``, YAML, flags);
- ``sources``, ``tasks``, ``passages``, ``code_edits``: the prompts (MT-Bench, HumanEval, GSM8K from
  PyPI wheels; input-grounded tasks over shipped documents and code);
- ``render``: chat template, multi-turn conditioning;
- ``methods``: what is compared (registry + discovery);
- ``measure``: warm-up, repetitions, interleaving, timing;
- ``identity``: greedy outputs against plain decoding;
- ``metrics``: speedup and tau;
- ``environment``, ``report``: JSON, Markdown (Spec-Bench's table or the demo's), PNG;
- ``runner``: ``run_bench``, tying them together.

    from hf_spec.bench import make_config, run_bench
    run_bench(make_config(preset="quick"))
    run_bench(make_config(preset="demo"))      # what `hf-spec demo` and `make demo` run
"""

from .config import BenchConfig, make_config
from .methods import REGISTRY, Method, NotApplicable, available_methods, register
from .presets import PRESETS
from .runner import BenchResult, run_bench
from .tasks import TASK_GROUPS, Prompt, load_tasks

__all__ = [
    "REGISTRY",
    "TASK_GROUPS",
    "BenchConfig",
    "BenchResult",
    "Method",
    "NotApplicable",
    "PRESETS",
    "Prompt",
    "available_methods",
    "load_tasks",
    "make_config",
    "register",
    "run_bench",
]
