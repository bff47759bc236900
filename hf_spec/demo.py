"""`hf-spec demo`: plain generate() vs transformers' assisted decoding vs hf_spec drafters, in one run.

Every method decodes the same real prompts greedily; the table reports tokens/s (median over
repetitions, methods interleaved), speedup over plain generate() measured in this run, mean
accepted tokens per target forward, and whether the output is token-identical to plain generate().
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_spec
from hf_spec.drafters.early_exit import early_exit_model

DEMO_PROMPTS = [
    "Add type hints and a docstring to this Python function, and return the full function:\n\n"
    "def moving_average(values, window):\n"
    "    if window <= 0:\n"
    "        raise ValueError('window must be positive')\n"
    "    result = []\n"
    "    total = 0\n"
    "    for index, value in enumerate(values):\n"
    "        total += value\n"
    "        if index >= window:\n"
    "            total -= values[index - window]\n"
    "        if index >= window - 1:\n"
    "            result.append(total / window)\n"
    "    return result\n",
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


@dataclass
class Method:
    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    drafter: hf_spec.Drafter | None = None
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    taus: list[float] = field(default_factory=list)
    identical: bool = True


class ForwardCounter:
    """Counts target forward calls (for transformers' own methods, whose steps we cannot see)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def load(name_or_path: str, dtype=torch.float32):
    """A registry name of scripts/prepare_models.py (prepared on first use), a local folder or a Hub id."""
    from hf_spec.offline_models import OFFLINE_MODELS, prepare

    path = str(prepare(name_or_path)) if name_or_path in OFFLINE_MODELS else name_or_path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def build_methods(target, draft, max_new_tokens: int) -> list[Method]:
    greedy = dict(do_sample=False, max_new_tokens=max_new_tokens)

    def plain(ids):
        return target.generate(ids, **greedy)

    def hf_lookup(ids):
        return target.generate(ids, prompt_lookup_num_tokens=8, **greedy)

    def hf_assisted(ids):
        return target.generate(ids, assistant_model=draft, **greedy)

    def hf_spec_method(drafter):
        return lambda ids: target.generate(ids, assistant_model=drafter, **greedy)

    drafters = {
        "hf_spec prompt lookup (chain)": hf_spec.PromptLookupDrafter(max_ngram=3, num_tokens=8),
        "hf_spec prompt lookup (tree, 4 candidates)": hf_spec.PromptLookupDrafter(max_ngram=3, num_tokens=8,
                                                                                  max_candidates=4),
        "hf_spec draft model (chain, 4)": hf_spec.DraftModelDrafter(draft, num_tokens=4),
        "hf_spec draft model (top-2 tree, 4)": hf_spec.DraftModelDrafter(draft, num_tokens=4, top_k=2),
        "hf_spec draft model (adaptive)": hf_spec.DraftModelDrafter(draft, num_tokens=4, schedule="heuristic",
                                                                    confidence_threshold=0.4),
    }
    methods = [
        Method("plain generate()", plain),
        Method("transformers prompt lookup", hf_lookup),
        Method("transformers assisted (same draft)", hf_assisted),
    ]
    methods += [Method(name, hf_spec_method(drafter), drafter) for name, drafter in drafters.items()]
    return methods


def run_demo(target_name: str = "smollm2-135m-instruct", draft_name: str | None = None,
             early_exit_layers: int = 8, max_new_tokens: int = 128, repeats: int = 3, threads: int = 2,
             prompts: list[str] | None = None, out: str | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    target, tokenizer = load(target_name)
    if draft_name:
        draft, _ = load(draft_name)
        draft_label = draft_name
    else:
        draft = early_exit_model(target, early_exit_layers)
        draft_label = f"early exit after layer {early_exit_layers} of {target_name}"
    prompts = prompts or DEMO_PROMPTS
    encoded = [_chat_ids(tokenizer, prompt) for prompt in prompts]
    methods = build_methods(target, draft, max_new_tokens)
    counter = ForwardCounter(target)

    for method in methods:  # warm-up
        method.run(encoded[0][:, :32])
    reference: list[torch.Tensor] = []
    with tqdm(total=repeats * len(encoded) * len(methods), desc="demo", unit="gen") as progress:
        for repeat in range(repeats):
            for prompt_index, ids in enumerate(encoded):
                for method in methods:
                    counter.calls = 0
                    start = time.perf_counter()
                    output = method.run(ids)
                    method.times.append(time.perf_counter() - start)
                    new_tokens = output.shape[1] - ids.shape[1]
                    method.tokens.append(new_tokens)
                    method.taus.append(_tau(method, counter.calls, new_tokens))
                    if method.name == "plain generate()" and repeat == 0:
                        reference.append(output)
                    elif not torch.equal(output, reference[prompt_index]):
                        method.identical = False
                    progress.update()

    rows = _summarize(methods, repeats, len(encoded))
    print(_markdown(rows, target_name, draft_label, threads, max_new_tokens, repeats, len(encoded)))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"rows": rows, "environment": _environment(threads), "target": target_name,
                                         "draft": draft_label, "max_new_tokens": max_new_tokens,
                                         "repeats": repeats}, indent=2))
    return rows


def _chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def _tau(method: Method, target_calls: int, new_tokens: int) -> float:
    if method.drafter is not None:
        return method.drafter.stats.mean_accepted_tokens
    return new_tokens / max(target_calls, 1)


def _summarize(methods: list[Method], repeats: int, num_prompts: int) -> list[dict]:
    def tokens_per_second(method: Method) -> float:
        per_repeat = []
        for repeat in range(repeats):
            window = slice(repeat * num_prompts, (repeat + 1) * num_prompts)
            per_repeat.append(sum(method.tokens[window]) / sum(method.times[window]))
        return statistics.median(per_repeat)

    baseline = tokens_per_second(methods[0])
    return [
        {
            "method": method.name,
            "tokens_per_second": tokens_per_second(method),
            "speedup": tokens_per_second(method) / baseline,
            "mean_accepted_tokens": statistics.mean(method.taus),
            "identical": method.identical,
        }
        for method in methods
    ]


def _markdown(rows, target, draft, threads, max_new_tokens, repeats, num_prompts) -> str:
    lines = [
        f"target: {target} | draft: {draft} | greedy, max_new_tokens={max_new_tokens}, {num_prompts} prompts, "
        f"median of {repeats} interleaved repeats, torch threads={threads}",
        "",
        "| method | tokens/s | speedup vs plain | mean accepted tokens | identical to plain |",
        "|---|---:|---:|---:|:---:|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['tokens_per_second']:.1f} | {row['speedup']:.2f}x | "
                     f"{row['mean_accepted_tokens']:.2f} | {'yes' if row['identical'] else 'NO'} |")
    return "\n".join(lines)


def _environment(threads: int) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "hf_spec": hf_spec.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": threads}
