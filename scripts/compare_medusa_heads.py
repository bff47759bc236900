"""Held-out accuracy of several Medusa-1 head checkpoints on one prepared data split, in one run.

Every checkpoint is scored on the same held-out conversations of a prepared data build (``hf-spec prepare-data``)
with ``hf_spec.training.evaluate.evaluate_heads``, the recipe's own evaluation: per head the probability that
the target's greedy token is the head's top-1 / top-k (in target ids: a token outside a draft vocabulary is a
miss), and the teacher-forced tau estimates of a top-1 chain and of the accuracy-derived tree. Prints a
Markdown table and, with ``--json``, writes the numbers.

    python scripts/compare_medusa_heads.py --data-config configs/data/smollm2-135m-selfdistill.yaml \\
        --heads artifacts/medusa-smollm2-135m-instruct --heads artifacts/medusa-smollm2-135m-instruct-selfdistill

Tokens per step of real decoding are the bench's (``hf-spec bench``), not this script's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def evaluate_checkpoint(path: str, target, heldout, collator, batch_size: int, top_k: int, tree_num_nodes: int) -> dict:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from hf_spec.drafters.medusa import MedusaHeads
    from hf_spec.training.evaluate import evaluate_heads
    from hf_spec.training.methods.medusa_objective import MedusaObjective

    heads = MedusaHeads.from_pretrained(path, target=target)
    if heads.config.medusa_version != 1 or heads.config.adapter:
        raise SystemExit(f"{path}: Medusa-2 heads read an adapted target; this script scores Medusa-1 heads only.")
    objective = MedusaObjective(target, heads, version=1, labels="soft")
    loader = DataLoader(heldout, batch_size=batch_size, collate_fn=collator)
    result = evaluate_heads(Accelerator(cpu=not torch.cuda.is_available()), objective, loader, top_k=top_k,
                            tree_num_nodes=tree_num_nodes)
    vocabulary = heads.draft_vocab
    result["draft_vocab_size"] = vocabulary.size if vocabulary is not None else None
    result["checkpoint"] = path
    return result


def markdown_table(results: list[dict], top_k: int) -> str:
    num_heads = max(len(result["heads"]) for result in results)
    columns = ["heads", "draft vocab"] + [f"head {k + 1} top-1 / top-{top_k}" for k in range(num_heads)]
    columns += ["tau chain", "tau tree"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        cells = [Path(result["checkpoint"]).name, str(result["draft_vocab_size"] or "full")]
        for k in range(num_heads):
            head = result["heads"][k] if k < len(result["heads"]) else None
            cells.append(f"{head['top1']:.1%} / {head[f'top{top_k}']:.1%}" if head else "")
        cells += [f"{result['tau_chain']:.2f}", f"{result['tau_tree']:.2f} ({result['tree_num_nodes']} nodes)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-config", required=True, help="recipe or data YAML whose data: section was prepared")
    parser.add_argument("--heads", action="append", required=True, help="a Medusa-1 checkpoint (folder or Hub id)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--max-examples", type=int, default=None, help="score only the first N held-out examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--tree-num-nodes", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_spec.training.data import PaddingCollator
    from hf_spec.training.models import load_target
    from hf_spec.training.prepare_data import load_prepared_data, load_recipe_sections

    model_section, data = load_recipe_sections(args.data_config, args.overrides)
    target, tokenizer = load_target(model_section.name_or_path, model_section.dtype, model_section.attn_implementation)
    prepared = load_prepared_data(data, tokenizer, target)
    features = ["final"] if "final" in [str(layer) for layer in data.cached_features()] else []
    heldout = prepared.dataset("heldout", features)
    if args.max_examples is not None:
        heldout = torch.utils.data.Subset(heldout, range(min(args.max_examples, len(heldout))))
    collator = PaddingCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    results = [evaluate_checkpoint(path, target, heldout, collator, args.batch_size, args.top_k, args.tree_num_nodes)
               for path in args.heads]
    print(f"Held-out split of {args.data_config}: {len(heldout)} conversations, {results[0]['positions']} "
          f"positions scored against the target's greedy token.\n")
    print(markdown_table(results, args.top_k))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
