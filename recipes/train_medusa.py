"""Train Medusa-1 / Medusa-2 heads for a causal LM (Cai et al. 2024), then evaluate, export and publish them.

    accelerate launch --config_file configs/accelerate/<single|ddp|zero2|zero3>.yaml \
        recipes/train_medusa.py --config configs/medusa/<model>.yaml [--set section.key=value ...]

The same as ``recipes/train.py`` for recipes of ``method: medusa`` (it refuses any other method). On
CPU-only machines prefix DDP launches with ACCELERATE_USE_CPU=true. The method is
hf_spec/training/methods/medusa.py; see configs/medusa/*.yaml for the settings.
"""

from hf_spec.training.recipe import main

if __name__ == "__main__":
    main(method="medusa")
