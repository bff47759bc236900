"""Distil a draft model from its target with TRL's on-policy GKD trainer, then save (and optionally publish) it.

    accelerate launch --config_file configs/accelerate/<single|ddp>.yaml \
        recipes/distill_draft.py --config configs/distill/<model>.yaml [--set section.key=value ...]

The teacher is the recipe's target (``model:``); the student is a smaller model with the same vocabulary
(``student.name_or_path``, optionally with LoRA) or the target's first layers (``student.layers``). Settings,
data and outputs: ``hf_spec/training/distill.py``. The exported folder loads with
``AutoModelForCausalLM.from_pretrained`` and drafts through ``hf_spec.DraftModelDrafter``. On CPU-only machines
prefix DDP launches with ACCELERATE_USE_CPU=true; a multi-process launch reads data built beforehand with
``hf-spec prepare-data --config <the same recipe>``.
"""

from hf_spec.training.distill import main

if __name__ == "__main__":
    main()
