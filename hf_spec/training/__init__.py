"""Draft-method training: one method-agnostic core and a registry of methods.

Core (knows no method): ``config`` (recipe sections), ``launch`` (accelerator for single / DDP / ZeRO-2 /
ZeRO-3), ``loop`` (the training loop), ``checkpoints`` (save, resume, weights across ranks), ``recipe``
(data -> train -> evaluate -> export -> card -> Hub), ``evaluate``, ``provenance`` and ``hub`` (files and
model cards; templates in ``cards/``). Data: ``data`` and its helpers. Methods: ``methods/<name>.py``, each
registering its config sections, objective, evaluation, export, drafter and card fields. ``recipes/train.py``
is the entry point for every method.

Nothing heavy is imported here, so inference code may use ``hf_spec.training.hub`` without pulling in
accelerate or DeepSpeed.
"""
