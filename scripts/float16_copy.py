"""Copy an exported drafter folder with its float32 weights stored in float16, to commit it under ``artifacts/``.

Every hf_spec drafter loads float16 weights into the target's dtype (``copy_`` into its parameters), so the copy
is a drop-in for the folder; it halves the size. Copies the exported files (``config.json``, model card,
``eval.json``, ``recipe.yaml``, a draft vocabulary) and never the training state (``checkpoints/``, metrics, Hub
exports in subfolders).

    python scripts/float16_copy.py outputs/mtp-smollm2-135m artifacts/mtp-smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_spec.training.hub import atomic_write

COPIED_AS_IS = ("config.json", "README.md", "eval.json", "recipe.yaml", "draft_vocab.json", "draft_vocab.safetensors")


def float16_copy(source: Path, destination: Path) -> list[str]:
    weights = source / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{source} has no model.safetensors: pass a drafter folder a recipe exported.")
    destination.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.to(torch.float16) if tensor.dtype == torch.float32 else tensor
               for name, tensor in load_file(weights).items()}
    atomic_write(destination / "model.safetensors", lambda path: save_file(tensors, path))
    copied = ["model.safetensors"]
    for name in COPIED_AS_IS:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the exported folder (a recipe's training.output_dir)")
    parser.add_argument("destination", type=Path, help="the folder to write, e.g. artifacts/<name>")
    args = parser.parse_args()
    copied = float16_copy(args.source, args.destination)
    print(f"wrote {args.destination}: {', '.join(copied)}")


if __name__ == "__main__":
    main()
