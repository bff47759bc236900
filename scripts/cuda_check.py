"""The CUDA path of the feature-level drafters, for a machine with a GPU (CI has none): on tiny Llama, Qwen2 and
Gemma3 targets on ``cuda``, each of EAGLE-3, Clover-2 and Falcon is fitted with its training objective, then
decodes with chains and dynamic trees. In float64 the output must be token-identical to plain ``generate()``; in
float32 and bfloat16 (where tree attention and one-token decoding may round differently) the script reports how
many tokens match. Sampling runs once per drafter. Prints and writes a JSON report.

    PYTHONPATH=. python scripts/cuda_check.py --out cuda_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from hf_spec import CloverDrafter, Eagle3Drafter, FalconDrafter
from tests import test_clover, test_eagle3, test_falcon
from tests.conftest import tiny_model, tiny_prompt

FITTERS = {  # method -> (fit a module with its training objective, the drafter class)
    "eagle3": (test_eagle3.fitted_draft, Eagle3Drafter),
    "clover": (test_clover.fitted_heads, CloverDrafter),
    "falcon": (test_falcon.fitted_draft, FalconDrafter),
}


def generate(target, prompt, drafter=None, **kwargs):
    return target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                           assistant_model=drafter, **kwargs)


def check(device: str, archs=("llama", "qwen2", "gemma3"), methods=tuple(FITTERS)) -> list[dict]:
    report = []
    for arch in archs:
        target = tiny_model(arch, dtype=torch.float64).to(device)
        prompt = tiny_prompt(seed=2, length=8).to(device)
        data = generate(target, prompt)
        for method in methods:
            fit, drafter_class = FITTERS[method]
            module = fit(target.to(torch.float64), data)
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                model = target.to(dtype)
                expected = generate(model, prompt)
                for tree in ("chain", "dynamic"):
                    drafter = drafter_class(copy.deepcopy(module), tree=tree, top_k=3, budget=10)
                    start = time.perf_counter()
                    got = generate(model, prompt, drafter)
                    seconds = time.perf_counter() - start
                    tau = drafter.stats.mean_accepted_tokens
                    length = min(got.shape[1], expected.shape[1])
                    sampled = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                             do_sample=True, temperature=0.8, assistant_model=drafter)
                    row = {"arch": arch, "dtype": str(dtype).removeprefix("torch."), "method": method, "tree": tree,
                           "identical": bool(torch.equal(got, expected)),
                           "matching_tokens": int((got[0, :length] == expected[0, :length]).sum()),
                           "tokens": int(expected.shape[1]), "tau": round(tau, 2),
                           "sampled_tokens": int(sampled.shape[1] - prompt.shape[1]), "seconds": round(seconds, 2)}
                    report.append(row)
                    print(json.dumps(row), flush=True)
            target = target.to(torch.float64)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    parser.add_argument("--archs", nargs="+", default=["llama", "qwen2", "gemma3"])
    parser.add_argument("--methods", nargs="+", default=list(FITTERS), choices=list(FITTERS))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run this on a machine with a GPU (or pass --device cpu).")
    report = check(args.device, args.archs, args.methods)
    strict = [row for row in report if row["dtype"] == "float64"]
    summary = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
               "torch": torch.__version__, "float64_all_identical": all(row["identical"] for row in strict),
               "rows": report}
    print(json.dumps({key: value for key, value in summary.items() if key != "rows"}))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(summary, handle, indent=2)
    if not summary["float64_all_identical"]:
        raise SystemExit("float64 speculative output differs from plain generate() on this device.")


if __name__ == "__main__":
    main()
