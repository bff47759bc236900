"""Settings of a benchmark run, from defaults, a preset (``presets.py``), a YAML file and flags, in that order.

A YAML file uses the field names of ``BenchConfig`` (dashes or underscores), e.g.::

    target: hf_spec:qwen2.5-coder-1.5b-instruct
    draft: hf_spec:qwen2.5-coder-0.5b-instruct
    tasks: [mt_bench, code, math, summarization]
    limit: 5
    max_new_tokens: 128

See ``configs/bench/`` for the files behind the README's tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from hf_spec.models import provided_name

from .presets import PRESETS
from .tasks import TASK_GROUPS

TABLES = ("spec_bench", "demo")


@dataclass
class BenchConfig:
    """One run. ``temperature=0`` decodes greedily (and checks identity with plain decoding); ``> 0`` samples."""

    target: str = "hf_spec:smollm2-135m-instruct"  # model name (hf_spec.models): hf_spec:<name>, local folder or Hub id
    draft: str | None = None  # draft model with the target's tokenizer; default: an early exit of the target
    early_exit_layers: int | None = 8  # layers of that early exit; None: no draft unless ``draft`` is set
    methods: list[str] | None = None  # names, glob patterns or Drafter(...) specs; None: all available
    tasks: list[str] = field(default_factory=lambda: list(TASK_GROUPS))
    limit: int | dict | None = 5  # prompts per task group, or {group: n, "default": n} (MT-Bench: 2-turn conversations)
    max_new_tokens: int = 128
    temperature: float = 0.0
    repeats: int = 3
    warmup: int = 1
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    out: str | None = None  # output folder; default outputs/bench/<target>-<greedy|tT>
    progress: bool = True
    labels: dict[str, str] = field(default_factory=dict)  # method name -> the name its table row shows
    table: str = "spec_bench"  # "spec_bench": speedup per task group; "demo": one compact row per method
    cost_curve: bool = True  # measure the target's c(k)/c(1) after the run (hf_spec.bench.cost) and show it
    cpu_fast_path: bool = False  # hf_spec.accelerate_for_cpu on the target and the draft before measuring anything
    # With cpu_fast_path: also time plain generate() on an unaccelerated copy of the target, in the same run (the
    # end-to-end gain over default kernels; the row's speedup is its ratio to plain decoding with the fast path).
    default_kernels_baseline: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def output_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        mode = "greedy" if self.greedy else f"t{self.temperature:g}"
        name = provided_name(self.target) or Path(self.target).name
        return Path("outputs") / "bench" / f"{name}-{mode}"


def make_config(path: str | None = None, preset: str | None = None, **overrides) -> BenchConfig:
    """Defaults, then the named preset, then the YAML file at ``path``, then ``overrides`` that are not None."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose from {', '.join(PRESETS)}.")
    settings: dict = dict(PRESETS[preset]) if preset else {}
    if path:
        settings.update(read_yaml(path))
    settings.update({key: value for key, value in overrides.items() if value is not None})
    known = {item.name for item in fields(BenchConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"Unknown benchmark setting(s) {unknown}; known: {sorted(known)}.")
    config = replace(BenchConfig(), **settings)
    _validate(config)
    return config


def read_yaml(path: str) -> dict:
    content = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(content).__name__}.")
    return {str(key).replace("-", "_"): value for key, value in content.items()}


def _validate(config: BenchConfig) -> None:
    for name in ("tasks", "methods"):
        value = getattr(config, name)
        if isinstance(value, str):
            setattr(config, name, split_list(value))
    if config.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {config.temperature}.")
    if config.repeats < 1 or config.max_new_tokens < 1 or config.threads < 1:
        raise ValueError("repeats, max_new_tokens and threads must be at least 1.")
    if config.early_exit_layers is not None and config.early_exit_layers < 1:
        raise ValueError(f"early_exit_layers must be at least 1 (or null for no early-exit draft), "
                         f"got {config.early_exit_layers}.")
    if config.default_kernels_baseline and not config.cpu_fast_path:
        raise ValueError("default_kernels_baseline compares plain decoding without the fast path to plain decoding "
                         "with it: set cpu_fast_path too (--cpu-fast-path).")
    if config.table not in TABLES:
        raise ValueError(f"table must be one of {', '.join(TABLES)}, got {config.table!r}.")
    if not isinstance(config.labels, dict):
        raise ValueError("labels must map method names to the names their table rows show.")
    if isinstance(config.limit, str):
        config.limit = parse_limit(config.limit)
    limits = config.limit.items() if isinstance(config.limit, dict) else [("limit", config.limit)]
    for name, value in limits:
        if name not in TASK_GROUPS and name not in ("default", "limit"):
            raise ValueError(f"limit names an unknown task group {name!r}; choose from {', '.join(TASK_GROUPS)} or 'default'.")
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"limit for {name} must be a whole number >= 1 (or null for every prompt), got {value!r}.")


def parse_limit(text: str) -> int | dict[str, int]:
    """``"3"`` -> 3; ``"code=3, math=2, default=1"`` -> ``{"code": 3, "math": 2, "default": 1}``."""
    if "=" not in text:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"limit {text!r} is neither a number nor group=number pairs (e.g. code=3,default=1).") from None
    limits = {}
    for part in split_list(text):
        name, _, value = part.partition("=")
        try:
            limits[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"limit entry {part!r} is not group=number.") from None
    return limits


def split_list(text: str) -> list[str]:
    """Split ``"a, b(x=1, y=2)"`` at the commas outside parentheses: ``["a", "b(x=1, y=2)"]``."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part.strip() for part in parts + [current] if part.strip()]
