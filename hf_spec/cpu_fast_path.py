"""A CPU fast path for a model's linear layers: ``hf_spec.accelerate_for_cpu(model)``.

On CPUs torch's default float32 matrix products are far from the memory-bound limit for the few-row products of
decoding, and worse for the 2-32 rows of a speculative verification (issue 15 measured a Linear(1536 -> 8960) at
3.8 ms for one row and 13.1 ms for eight; 2.7 and 3.7 ms with oneDNN and prepacked weights). This swaps every
``torch.nn.Linear`` for ``PackedLinear``: torch's oneDNN linear (``torch._C._nn.mkldnn_linear``) with the weight
packed once in oneDNN's layout, each call converting its input. It is an opt-in applied once, to the target and to a draft
model alike, and it speeds plain decoding too. Float32 stays float32: the model computes the same function up to
float rounding (greedy identity tests run with it on). No reduced precision here: that would be a separately named
option with its accuracy reported.

Costs: a tied output embedding gets its own packed copy (the input embedding keeps the dense one); the model becomes
inference-only (packed weights take no gradients and are not saved by ``save_pretrained``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import UnsupportedError

logger = logging.getLogger(__name__)
BACKENDS = ("onednn",)


def accelerate_for_cpu(model: nn.Module, backend: str = "onednn") -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` layers for oneDNN ones with prepacked weights, in place; returns ``model``.

    A no-op with a warning when the model is not on the CPU. Raises ``UnsupportedError`` for a model that is not
    float32 or a torch build without oneDNN.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown CPU backend {backend!r}; available: {BACKENDS}.")
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise UnsupportedError("accelerate_for_cpu needs a model with parameters.")
    if parameter.device.type != "cpu":
        logger.warning("accelerate_for_cpu: the model is on %s, not the CPU; nothing changed.", parameter.device)
        return model
    if not torch.backends.mkldnn.is_available():
        raise UnsupportedError("This torch build has no oneDNN (mkldnn): accelerate_for_cpu cannot pack weights; use "
                               "the model as it is.")
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if wrong:
        raise UnsupportedError(f"accelerate_for_cpu keeps float32 models float32 and this one holds {wrong}: load it "
                               "with dtype=torch.float32 (reduced precision is not part of this fast path).")
    swapped = _swap_linears(model)
    model.hf_spec_cpu_backend = backend
    logger.info("accelerate_for_cpu: %d linear layers now use oneDNN with prepacked weights.", swapped)
    return model


class PackedLinear(nn.Module):
    """``nn.Linear`` through oneDNN: the weight packed once (``to_mkldnn``), each call converting its input and
    output (what ``torch.utils.mkldnn.MkldnnLinear`` does, without its deprecated TorchScript)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to_mkldnn(), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.mkldnn_linear(x.to_mkldnn(), self.weight, self.bias).to_dense()


def _swap_linears(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += _swap_linears(child)
    return count


def cpu_backend(model: nn.Module) -> str:
    """``"default"`` or the fast path ``accelerate_for_cpu`` applied to ``model``."""
    return getattr(model, "hf_spec_cpu_backend", "default")
