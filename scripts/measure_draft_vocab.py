"""What a trimmed draft vocabulary saves: one draft step with the full lm_head vs with the top-N rows only.

A draft step is what DraftModelDrafter does per drafted token: one forward of the draft over one new token
with a warm KV cache (``context`` tokens), then the next-token distribution over the target's vocabulary
(softmax of the full-vocabulary row; for the trimmed draft, its N logits scattered into that row with -inf
elsewhere, as ``TrimmedOutputModel`` does). Steps of every variant are interleaved and repeated; medians are
reported. "decoder only" (no output projection at all) is the floor a trimmed head approaches.

    python scripts/measure_draft_vocab.py --model smollm2-135m-instruct --threads 1
    python scripts/measure_draft_vocab.py --model qwen2.5-coder-0.5b-instruct --threads 1   (after
        `hf-spec models prepare qwen2.5-coder-0.5b-instruct`)
    ... --vocab-config configs/data/smollm2-135m-selfdistill.yaml   (select the subsets from that prepared
        data and report their held-out coverage; otherwise the subsets are the first N token ids, which
        costs the same time)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from hf_spec.drafters.draft_vocab import DraftVocabulary, TrimmedOutputModel


def step_function(model_like, cache, token: torch.Tensor):
    """One draft step: a one-token forward with the cache, then the full-vocabulary distribution; the cache is
    cropped back so that every step sees the same context."""

    def step():
        logits = model_like(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        torch.softmax(logits[0, -1].float(), dim=-1)
        cache.crop(-1)

    return step


def decoder_only_function(model, cache, token: torch.Tensor):
    decoder = model.get_decoder()

    def step():
        decoder(input_ids=token, past_key_values=cache, use_cache=True)
        cache.crop(-1)

    return step


def time_steps(functions: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per step of each function, the functions interleaved within every repeat."""
    samples = {name: [] for name in functions}
    for function in functions.values():  # warm-up
        for _ in range(3):
            function()
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            for _ in range(steps):
                function()
            samples[name].append((time.perf_counter() - started) / steps * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def vocabularies(sizes: list[int], vocab_size: int, vocab_config: str | None, overrides: list[str]) -> tuple[dict, dict]:
    """The trimmed vocabulary of each size, and its held-out coverage when selected from prepared data."""
    if not vocab_config:
        return {size: DraftVocabulary(torch.arange(size), vocab_size) for size in sizes}, {}
    from hf_spec.training.models import load_target
    from hf_spec.training.prepare_data import load_prepared_data, load_recipe_sections, needs_target
    from hf_spec.training.vocab_selection import count_assistant_tokens

    model_section, data = load_recipe_sections(vocab_config, overrides)
    target, tokenizer = load_target(model_section.name_or_path, model_section.dtype)
    prepared = load_prepared_data(data, tokenizer, target if needs_target(data) else None)
    train = count_assistant_tokens(prepared, "train", vocab_size)
    heldout = count_assistant_tokens(prepared, "heldout", vocab_size)
    chosen = {size: DraftVocabulary.from_token_counts(train, size) for size in sizes}
    coverage = {size: {"train": round(v.coverage(train), 4), "heldout": round(v.coverage(heldout), 4),
                       "train_tokens": int(train.sum()), "heldout_tokens": int(heldout.sum())}
                for size, v in chosen.items()}
    return chosen, coverage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="offline model name or a local folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--context", type=int, default=256, help="tokens already in the draft's KV cache")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab-config", default=None, help="select the subsets from this prepared data config")
    parser.add_argument("--vocab-set", action="append", default=[], metavar="data.KEY=VALUE",
                        help="override the data config, e.g. data.num_conversations=256 to read the first shards of "
                             "a build still running")
    parser.add_argument("--out", default="outputs/draft_vocab_timing")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = args.model
    if not Path(path).is_dir():
        from hf_spec.offline_models import model_path

        path = str(model_path(args.model))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    head = model.get_output_embeddings().weight
    vocab_size, hidden = head.shape
    total = sum(p.numel() for p in model.parameters())
    chosen, coverage = vocabularies(args.sizes, vocab_size, args.vocab_config, args.vocab_set)

    generator = torch.Generator().manual_seed(0)
    context = torch.randint(100, vocab_size, (1, args.context), generator=generator)
    token = torch.randint(100, vocab_size, (1, 1), generator=generator)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=context, past_key_values=cache, use_cache=True, logits_to_keep=1)
        functions = {"decoder only": decoder_only_function(model, cache, token),
                     f"full ({vocab_size})": step_function(model, cache, token)}
        for size, vocabulary in chosen.items():
            functions[f"trimmed {size}"] = step_function(TrimmedOutputModel(model, vocabulary), cache, token)
        medians = time_steps(functions, args.steps, args.repeats)

    full = medians[f"full ({vocab_size})"]
    rows = []
    for name, ms in medians.items():
        size = int(name.split()[1]) if name.startswith("trimmed") else (vocab_size if name.startswith("full") else 0)
        rows.append({"variant": name, "ms_per_step": round(ms, 2), "speedup_vs_full": round(full / ms, 3),
                     "lm_head_rows": size, "lm_head_params_M": round(size * hidden / 1e6, 1),
                     "coverage": coverage.get(size)})
    result = {"model": args.model, "parameters_M": round(total / 1e6, 1), "vocab_size": vocab_size, "hidden": hidden,
              "context": args.context, "threads": args.threads, "dtype": args.dtype, "steps": args.steps,
              "repeats": args.repeats, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{Path(args.model).name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model}: {result['parameters_M']}M parameters, lm_head {vocab_size} x {hidden} "
          f"({vocab_size * hidden / 1e6:.1f}M), context {args.context}, {args.threads} thread(s), {args.dtype}")
    print("| variant | ms / draft step | speedup vs full | lm_head params | held-out coverage |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        covered = f"{row['coverage']['heldout']:.1%}" if row["coverage"] else ""
        print(f"| {row['variant']} | {row['ms_per_step']:.2f} | {row['speedup_vs_full']:.2f}x | "
              f"{row['lm_head_params_M']}M | {covered} |")


if __name__ == "__main__":
    main()
