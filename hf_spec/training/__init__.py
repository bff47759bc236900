"""Draft-head training: data (``data``), losses (``losses``), the accelerate glue (``trainer``), evaluation
(``evaluate``) and publishing (``hub``). Recipes in ``recipes/`` are thin entry points over these modules.

Nothing heavy is imported here, so inference code may use ``hf_spec.training.hub`` without pulling in
accelerate or DeepSpeed.
"""
