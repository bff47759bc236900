"""``run_bench``: one Spec-Bench-style run (Xia et al. 2024) from settings to result files.

Load the target (and a draft: the given one, or an early exit of the target), pick the prompts,
build the methods, answer earlier conversation turns with the baseline, warm up, measure with
repetitions in interleaved order, check greedy outputs against plain decoding, summarise, and write
``results.json`` (every raw measurement and the environment), ``results.md`` (the table) and
``speedup.png`` (with matplotlib) into the output folder. ``hf-spec demo`` is this run with the
``demo`` preset and its compact table.
"""

from __future__ import annotations

import copy
import hashlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hf_spec.cpu_fast_path import accelerate_for_cpu
from hf_spec.drafters.early_exit import early_exit_model
from hf_spec.models import load_model

from .config import BenchConfig
from .cost import cost_curve, curve_line
from .environment import cpu_name, environment, load_average, model_info
from .identity import Mismatch, check_identity, explain
from .measure import Measurement, measure, warm_up
from .methods import BASELINE, Method, build_methods, plain_default_kernels
from .metrics import summarize
from .render import BenchItem, render_items
from .report import demo_markdown, markdown, plot, unique_mismatches, write_json
from .tasks import Prompt, load_tasks

BUSY_LOAD = 1.0  # other processes keeping more than one core busy
BENCH_COST_TOKENS = (1, 2, 4, 8, 16)  # the cost curve the header shows
FULL_TABLES = ("Full tables, every method and task group: `hf-spec bench` (`--quick`: about 5 minutes; "
               "`--config configs/bench/<model>.yaml`: the README's tables; `--list-methods`: what it compares).")


@dataclass
class BenchResult:
    rows: list[dict]
    measurements: list[Measurement]
    mismatches: list[Mismatch]
    skipped: dict[str, str]
    table: str
    files: dict[str, Path] = field(default_factory=dict)


def _measured_as_spec(name: str, methods) -> bool:
    """Whether a drafter skipped by discovery (``Class``) runs anyway as an explicit spec (``Class(...)``)."""
    return any(method.name.startswith(name + "(") or method.name.startswith(name + ".") for method in methods)


def run_bench(config: BenchConfig, *, target=None, tokenizer=None, draft=None,
              prompts: list[Prompt] | None = None) -> BenchResult:
    """Run the benchmark. ``target``/``tokenizer``/``draft``/``prompts`` replace loading them from ``config``."""
    start = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    env = environment(config.threads)
    _warn_if_busy(env["load_average"])
    target_label = config.target if target is None else f"{type(target).__name__} (given)"
    if target is None:
        target, tokenizer = load_model(config.target)
    draft, draft_label = _draft(config, target, draft)
    unaccelerated = copy.deepcopy(target) if config.default_kernels_baseline else None
    if config.cpu_fast_path:  # after the early exit is cut from the target's weights; each model packs its own
        accelerate_for_cpu(target)
        if draft is not None:
            accelerate_for_cpu(draft)
    prompts = load_tasks(config.tasks, config.limit, config.seed) if prompts is None else prompts
    generation = generation_kwargs(config)

    methods, skipped = build_methods(target, draft, generation, config.methods)
    if unaccelerated is not None:
        methods.insert(1, plain_default_kernels(unaccelerated, generation))
    baseline = methods[0]
    items = render_items(prompts, tokenizer, lambda ids: baseline.generate(ids)[0, ids.shape[1]:], config.progress)
    unsupported = warm_up(methods, items[0], config.warmup)
    skipped.update(unsupported)
    methods = [method for method in methods if method.name not in unsupported]
    skipped = {name: why for name, why in skipped.items() if not _measured_as_spec(name, methods)}
    measurements, outputs = measure(target, methods, items, config.repeats, config.seed, not config.greedy,
                                    config.progress)
    mismatches: list[Mismatch] = []
    if config.greedy:
        mismatches = check_identity(measurements, outputs, BASELINE)
        explain(mismatches, target, items, outputs, BASELINE)

    groups = list(dict.fromkeys(item.group for item in items))
    rows = summarize(measurements, [method.name for method in methods], groups, BASELINE)
    for row, method in zip(rows, methods):
        row["lossless"] = method.lossless
    header = _header(config, target_label, draft_label, prompts, items, env)
    curve = _cost_curve(target, items) if config.cost_curve else None
    one_token_ms = None
    if curve is not None:
        line = curve_line(curve)
        header += f" {line[0].upper()}{line[1:]}."
        one_token_ms = 1000 * next(iter(curve["contexts"].values()))["seconds"][1]
    if config.table == "demo":
        table = demo_markdown(rows, header, config.greedy, skipped, mismatches, tokenizer, config.labels, FULL_TABLES)
    else:
        table = markdown(rows, groups, header, config.greedy, skipped, mismatches, tokenizer, config.labels,
                         one_token_ms)
    payload = {
        "command": sys.argv,
        "config": asdict(config),
        "environment": {**env, "load_average_after": load_average()},
        "models": {"target": model_info(target, target_label), "draft": _draft_info(draft, draft_label, config)},
        "generation": generation,
        "cost_curve": curve,
        "methods": [_method_info(method) for method in methods],
        "skipped_methods": skipped,
        "items": [_item_info(item, outputs, tokenizer) for item in items],
        "measurements": [record.as_dict() for record in measurements],
        "summary": rows,
        "mismatches": [mismatch.as_dict() for mismatch in mismatches],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    result = BenchResult(rows, measurements, mismatches, skipped, table)
    result.files = _write(config.output_dir(), payload, table, rows, groups, f"{target_label}, draft: {draft_label}",
                          config.labels)
    _announce(result, tokenizer)
    return result


def generation_kwargs(config: BenchConfig) -> dict:
    if config.greedy:
        return {"max_new_tokens": config.max_new_tokens, "do_sample": False}
    return {"max_new_tokens": config.max_new_tokens, "do_sample": True, "temperature": config.temperature}


def _draft(config: BenchConfig, target, draft) -> tuple[object | None, str]:
    if draft is not None:
        return draft, config.draft or f"{type(draft).__name__} (given)"
    if config.draft:
        return load_model(config.draft)[0], config.draft
    if config.early_exit_layers is not None and config.early_exit_layers < target.config.num_hidden_layers:
        return early_exit_model(target, config.early_exit_layers), f"early exit after layer {config.early_exit_layers}"
    return None, "none"


def _draft_info(draft, label: str, config: BenchConfig) -> dict | None:
    if draft is None:
        return None
    if config.draft is None and label.startswith("early exit"):
        return {"label": label, "early_exit_of": "target", "num_hidden_layers": draft.config.num_hidden_layers}
    return model_info(draft, label)


def _method_info(method: Method) -> dict:
    info = {"name": method.name, "kind": method.kind, "description": method.description, "lossless": method.lossless}
    if method.drafter is not None:
        info["drafter"] = repr(method.drafter)
        info["trained_weights_sha256"] = trained_weights_digests(method.drafter)
    return info


def trained_weights_digests(drafter) -> dict[str, str]:
    """SHA-256 of the weights a drafter owns besides whole models (e.g. Medusa heads), by attribute name."""
    digests = {}
    for name, value in vars(drafter).items():
        if not name.startswith("_") and isinstance(value, torch.nn.Module) and not isinstance(value, PreTrainedModel):
            digest = hashlib.sha256()
            for key, tensor in sorted(value.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            digests[name] = digest.hexdigest()
    return digests


def _item_info(item: BenchItem, outputs: dict, tokenizer) -> dict:
    tokens = outputs[(BASELINE, item.id, 0)]
    return {"id": item.id, "group": item.group, "prompt_tokens": item.input_ids.shape[1], "messages": item.messages,
            "baseline_output": tokenizer.decode(tokens, skip_special_tokens=True)}


def _cost_curve(target, items: list[BenchItem]) -> dict:
    """The target's cost curve after as many cached tokens as the run's median prompt, in the run's machine state."""
    context = int(statistics.median(item.input_ids.shape[1] for item in items))
    return cost_curve(target, contexts=(context,), new_tokens=BENCH_COST_TOKENS, repeats=3)


def _header(config: BenchConfig, target_label: str, draft_label: str, prompts: list[Prompt],
            items: list[BenchItem], env: dict) -> str:
    mode = "greedy" if config.greedy else f"sampling at temperature {config.temperature:g}"
    command = "demo" if config.table == "demo" else "bench"
    shown = f" ({', '.join(item.id for item in items)})" if len(items) <= 6 else ""
    return (f"**hf-spec {command}** - target `{target_label}`, draft `{draft_label}`; {mode}, max_new_tokens="
            f"{config.max_new_tokens}; {len(prompts)} prompts{shown} ({len(items)} generations per method and repetition); "
            f"median of {config.repeats} interleaved repetitions after {config.warmup} warm-up; torch threads "
            f"{config.threads}; {cpu_name()}; load average {env['load_average'] and env['load_average'][0]} at start; "
            f"torch {env['torch']}, transformers {env['transformers']}.")


def _warn_if_busy(load: list[float] | None) -> None:
    if load and load[0] > BUSY_LOAD:
        print(f"[hf_spec bench] the machine is busy (load average {load[0]} over the last minute): timings will be "
              "noisy and slower than usual; ratios measured in this run remain comparable with each other, but "
              "prefer an otherwise idle machine for results you publish.", file=sys.stderr)


def _write(folder: Path, payload: dict, table: str, rows: list[dict], groups: list[str], subtitle: str,
           labels: dict[str, str]) -> dict[str, Path]:
    """The result files; the plot only where matplotlib is installed (the numbers never depend on it)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": folder / "results.json", "markdown": folder / "results.md"}
    write_json(files["json"], payload)
    files["markdown"].write_text(table)
    try:
        plot(rows, groups, folder / "speedup.png", subtitle, labels)
        files["plot"] = folder / "speedup.png"
    except ImportError as error:
        print(f"[hf_spec bench] no speedup.png: {error}", file=sys.stderr)
    return files


def _announce(result: BenchResult, tokenizer) -> None:
    print(result.table)
    print("Wrote " + ", ".join(str(path) for path in result.files.values()))
    if result.mismatches:
        lines = [mismatch.describe(tokenizer) for mismatch in unique_mismatches(result.mismatches)]
        banner = "!" * 100
        print("\n".join([banner, f"IDENTITY CHECK FAILED: {len(result.mismatches)} greedy generation(s) differ from "
                                  "plain generate()", *lines, banner]), file=sys.stderr)
