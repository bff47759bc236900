"""Helpers shared by the tests (fixtures stay in conftest.py)."""

from __future__ import annotations

import copy

import torch


def perturbed_copy(model, scale: float, seed: int = 1):
    """``model`` with gaussian noise of ``scale`` times each weight tensor's standard deviation added.

    A draft that agrees with the target often but not always: partial acceptance in the middle of
    trees, corrections and bonus tokens all happen within a few steps.
    """
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(noise * scale * parameter.std().clamp_min(1e-3))
    return noisy
