"""Train any registered draft method (the recipe's ``method:``), then evaluate, export and publish it.

    accelerate launch --config_file configs/accelerate/<single|ddp|zero2|zero3>.yaml \
        recipes/train.py --config configs/<method>/<model>.yaml [--set section.key=value ...]

One entry point for every method in hf_spec/training/methods/ and all four launch modes (single
process, DDP, DeepSpeed ZeRO-2, ZeRO-3). On CPU-only machines prefix DDP launches with
ACCELERATE_USE_CPU=true; DeepSpeed launches need nothing extra.
"""

from hf_spec.training.recipe import main

if __name__ == "__main__":
    main()
