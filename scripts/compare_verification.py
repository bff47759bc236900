"""Evidence for the verification rules and tree shapes, measured in one run on the same prompts.

Part 1 (sampling, temperatures 0.6 and 1.0): mean accepted tokens per target forward (tau) of
RRS, RRS without replacement and SpecHub, each with drafts drawn the way the rule needs (two drafts
per node: the draft model's static top-2 tree; prompt lookup with two candidates).
Part 2 (greedy): chain vs static top-k tree vs dynamic tree vs adaptive draft lengths vs
transformers' assisted generation: tau, speedup over plain generate() and token identity.

    python scripts/compare_verification.py --target hf_spec:smollm2-135m-instruct --out outputs/verification_smollm2.md
    python scripts/compare_verification.py --target hf_spec:qwen2.5-coder-1.5b-instruct \\
        --draft hf_spec:qwen2.5-coder-0.5b-instruct --out outputs/verification_qwen.md

Models are named as everywhere in hf_spec (``hf_spec.models``): ``hf_spec:<name>``, a local folder or a Hub id.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

import hf_spec
from hf_spec.bench.code_edits import CODE_EDITS
from hf_spec.bench.render import chat_ids
from hf_spec.drafters.early_exit import early_exit_model
from hf_spec.models import load_model

RULES = ["rrs", "rrs_without_replacement", "spechub"]

# The four prompts of the runs in the README (a code edit, a summary, an extraction, an open question).
PROMPTS = [
    CODE_EDITS[0]["request"].rstrip(".") + ":\n\n" + CODE_EDITS[0]["code"],
    "Summarize the following text in two sentences.\n\n"
    "The Rhine is one of the major European rivers. It begins in the Swiss canton of Graubunden in the "
    "southeastern Swiss Alps, forms part of the Swiss-Liechtenstein, Swiss-Austrian and Swiss-German "
    "borders and then the Franco-German border, then flows through the German Rhineland and the "
    "Netherlands and eventually empties into the North Sea. The Rhine is an important waterway for "
    "shipping goods, and many castles and vineyards line its banks.",
    "Extract every person and the year they are mentioned with, as a list of 'name - year' lines.\n\n"
    "Ada Lovelace published her notes on the Analytical Engine in 1843. Alan Turing described his "
    "machine in 1936. Grace Hopper built the first compiler in 1952, and Margaret Hamilton led the "
    "Apollo flight software team in 1969.",
    "Explain what a hash map is and when to use one, in three short sentences.",
]


BINARY_TREE_DEPTH_3 = [path for depth in (1, 2, 3) for path in itertools.product((0, 1), repeat=depth)]


def sampling_table(target, draft, prompts, max_new_tokens, seeds, temperatures, medusa=None) -> list[str]:
    drafters = {
        "draft model, top-2 tree x4": lambda: hf_spec.DraftModelDrafter(draft, num_tokens=4, top_k=2),
        "prompt lookup, 2 candidates": lambda: hf_spec.PromptLookupDrafter(num_tokens=6, max_candidates=2),
    }
    if medusa:
        drafters["Medusa heads, 2 sampled children x3"] = lambda: hf_spec.MedusaDrafter.from_pretrained(
            medusa, target, rank_paths=BINARY_TREE_DEPTH_3, proposal="sample")
    lines = ["| drafter | temperature | " + " | ".join(RULES) + " |", "|---|---:|" + "---:|" * len(RULES)]
    for name, make in drafters.items():
        for temperature in temperatures:
            taus = []
            for rule in RULES:
                tokens = forwards = 0
                for seed in range(seeds):
                    for ids in prompts:
                        torch.manual_seed(seed)
                        drafter = make()
                        target.generate(ids, assistant_model=drafter, do_sample=True, temperature=temperature,
                                        top_k=0, max_new_tokens=max_new_tokens, verification=rule)
                        tokens += drafter.stats.new_tokens
                        forwards += drafter.stats.target_forwards
                taus.append(tokens / forwards)
            lines.append(f"| {name} | {temperature} | " + " | ".join(f"{tau:.3f}" for tau in taus) + " |")
            print(lines[-1], flush=True)
    return lines


def greedy_table(target, draft, prompts, max_new_tokens, repeats) -> list[str]:
    greedy = dict(do_sample=False, max_new_tokens=max_new_tokens)
    methods = {
        "plain generate()": (None, {}),
        "transformers assisted (same draft)": ("hf", {}),
        "chain, 4 tokens": (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=4), {}),
        "chain, heuristic schedule": (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=4, schedule="heuristic"), {}),
        "chain, confidence < 0.4 stops": (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=8,
                                                                            confidence_threshold=0.4), {}),
        "static top-2 tree, depth 4": (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=4, top_k=2), {}),
        "dynamic tree, depth 4, 16 nodes": (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=4),
                                            dict(tree="dynamic", tree_top_k=4, tree_budget=16)),
        "dynamic tree, depth 6, 32 nodes": (lambda: hf_spec.DraftModelDrafter(draft, num_tokens=6),
                                            dict(tree="dynamic", tree_top_k=4, tree_budget=32)),
    }
    results = {name: {"seconds": [], "tokens": [], "tau_tokens": 0, "tau_forwards": 0, "identical": True}
               for name in methods}
    reference = [target.generate(ids, **greedy) for ids in prompts]
    for repeat in range(repeats):
        for index, ids in enumerate(prompts):
            for name, (make, extra) in methods.items():
                drafter = make() if callable(make) else None
                assistant = draft if make == "hf" else drafter
                start = time.perf_counter()
                out = target.generate(ids, assistant_model=assistant, **greedy, **extra)
                seconds = time.perf_counter() - start
                entry = results[name]
                entry["seconds"].append(seconds)
                entry["tokens"].append(out.shape[1] - ids.shape[1])
                entry["identical"] &= torch.equal(out, reference[index])
                if drafter is not None:
                    entry["tau_tokens"] += drafter.stats.new_tokens
                    entry["tau_forwards"] += drafter.stats.target_forwards

    def speed(entry):
        per_repeat = []
        size = len(prompts)
        for repeat in range(repeats):
            window = slice(repeat * size, (repeat + 1) * size)
            per_repeat.append(sum(entry["tokens"][window]) / sum(entry["seconds"][window]))
        return statistics.median(per_repeat)

    baseline = speed(results["plain generate()"])
    lines = ["| method | tokens/s | speedup | mean accepted tokens | identical |", "|---|---:|---:|---:|:---:|"]
    for name, entry in results.items():
        tau = entry["tau_tokens"] / entry["tau_forwards"] if entry["tau_forwards"] else float("nan")
        lines.append(f"| {name} | {speed(entry):.1f} | {speed(entry) / baseline:.2f}x | "
                     f"{'-' if tau != tau else f'{tau:.2f}'} | {'yes' if entry['identical'] else 'NO'} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="hf_spec:smollm2-135m-instruct")
    parser.add_argument("--draft", default=None, help="default: an early exit of the target")
    parser.add_argument("--early-exit-layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--medusa", default=None, help="trained Medusa heads (folder or Hub id): one more drafter")
    parser.add_argument("--skip", choices=["sampling", "greedy"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    target, tokenizer = load_model(args.target)
    draft = load_model(args.draft)[0] if args.draft else early_exit_model(target, args.early_exit_layers)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": prompt}]) for prompt in PROMPTS[: args.prompts]]
    draft_name = args.draft or f"early exit after {args.early_exit_layers} layers"
    header = (f"target {args.target}, draft {draft_name}, {len(prompts)} prompts, "
              f"max_new_tokens={args.max_new_tokens}, torch threads={args.threads}")
    sections = [header, ""]
    if args.skip != "sampling":
        sections += ["Mean accepted tokens per target forward, sampling "
                     f"({args.seeds} seeds per prompt, same seeds for every rule):", ""]
        sections += sampling_table(target, draft, prompts, args.max_new_tokens, args.seeds, [0.6, 1.0],
                                   args.medusa) + [""]
    if args.skip != "greedy":
        sections += [f"Greedy (median of {args.repeats} interleaved repeats):", ""]
        sections += greedy_table(target, draft, prompts, args.max_new_tokens, args.repeats)
    text = "\n".join(sections)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
