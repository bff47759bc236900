"""Gated LoRA (Samragh et al. 2025, "Your LLM Knows the Future: Uncovering Its Multi-Token Prediction Potential").

The paper adapts every linear layer of the decoder with ``y = W x + g * (B A x) * alpha / r``, where ``g`` is 1 on
the mask-token rows that predict future tokens and 0 on ordinary rows: the model learns multi-token prediction while
its next-token outputs stay exactly those of the base model, so speculative decoding with it stays lossless and the
ordinary rows' KV cache is the base model's own. ``GatedLoRALinear`` is that layer; ``apply_gated_lora`` puts it on
the attention and MLP projections of a Llama / Qwen2 / Gemma3 decoder.

Exactness: on a row whose gate is 0 the output is the base layer's output itself (the base ``nn.Linear`` is called
as the model calls it, and the LoRA term is computed only for the gated rows and added there, in place on a
contiguous range of rows or by ``index_add``), never ``base + 0 * lora``: that would turn ``-0.0`` into ``0.0`` and a
non-finite LoRA term into NaN, and may take another kernel than the base.

Why not peft's activated LoRA (aLoRA, peft 0.21, ``LoraConfig(alora_invocation_tokens=...)``): its
``ALoraLinearVariant.forward`` turns ``alora_offsets[i]`` into the mask ``position >= T - alora_offsets[i]``, i.e.
the adapter is active on one contiguous *suffix* of each row (from the last occurrence of the invocation tokens to
the end). That fits inference, where the mask tokens are appended after the committed sequence, but not the
paper's training layout, where a block of ``k`` mask tokens follows many positions of one sequence and ordinary
tokens come after each block (``hf_spec.drafters.mtp.layout``): the gate there is an arbitrary per-row 0/1 mask,
which an offset per row cannot express. A per-position gate also serves inference (masks after the root and after
each speculated token, "quadratic decoding") with the same code. The adapter is never merged into ``W``.

The gate is a ``LoRAGate`` shared by all the gated layers of a model: ``with gate.open(mask): model(...)`` sets it
for one forward; outside such a block (gate ``None``) every layer is exactly its base layer.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ...cpu_fast_path import PackedLinear
from ...errors import UnsupportedError

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAGate:
    """The per-position 0/1 gate shared by the gated layers of one model (a plain object: no parameters).

    Opening it resolves the gated rows once per forward (every gated layer of the model reads them): ``rows``, their
    flat indices in ``(batch * seq)``, and ``span``, the same rows as a slice when they are one contiguous range (the
    mask blocks that decoding appends after the block rows), which the layers update in place instead of by index.
    """

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.span: slice | None = None

    @contextmanager
    def open(self, mask: torch.Tensor):
        """Gate the adapter to the rows where ``mask`` ``(batch, seq)`` (bool) is True for the enclosed forward."""
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"The LoRA gate must be a (batch, seq) bool tensor, got {tuple(mask.shape)} {mask.dtype}.")
        if self.mask is not None:
            raise RuntimeError("The LoRA gate is already open (nested forwards of one gated model are not supported).")
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        first, last = (int(rows[0]), int(rows[-1])) if rows.numel() else (0, -1)
        self.mask, self.rows = mask, rows
        self.span = slice(first, last + 1) if rows.numel() and last - first + 1 == rows.numel() else None
        try:
            yield self
        finally:
            self.mask, self.rows, self.span = None, None, None


class GatedLoRALinear(nn.Module):
    """``y = base(x)``, plus ``B A x * alpha / rank`` on the rows the gate opens (Samragh et al. 2025).

    ``A`` starts like an ``nn.Linear`` weight (Kaiming uniform), ``B`` at zero, so a fresh adapter changes nothing.
    The base layer stays a child (``base_layer``) and is frozen by the caller, not here.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, gate: LoRAGate):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, PackedLinear)):
            raise UnsupportedError(f"Gated LoRA wraps nn.Linear layers (or hf_spec.accelerate_for_cpu's packed ones), "
                                   f"got {type(base_layer).__name__}; a quantized or already adapted model is not "
                                   "supported: load the base model in a float dtype.")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Gated LoRA rank must be a positive integer, got {rank!r}.")
        self.base_layer = base_layer
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.gate = gate
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        mask = self.gate.mask
        if mask is None:
            return out
        if tuple(x.shape[:-1]) != tuple(mask.shape):
            raise RuntimeError(f"The LoRA gate has shape {tuple(mask.shape)} but the layer sees rows "
                               f"{tuple(x.shape[:-1])}: set the gate for exactly the forward's (batch, seq).")
        rows, span = self.gate.rows, self.gate.span
        if rows.numel() == 0:
            return out
        out = out.contiguous()  # a no-op for nn.Linear's output: the view below shares its storage
        flat_in, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        if span is not None:  # one contiguous range: add in place on it, the other rows' values are never touched
            delta = (flat_in[span].to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
            flat_out[span].add_(delta.to(out.dtype), alpha=self.scaling)
            return out
        delta = (flat_in.index_select(0, rows).to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return flat_out.index_add(0, rows, (delta * self.scaling).to(out.dtype)).view(out.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a Llama / Qwen2 / Gemma3-style causal LM (``model.model.layers``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedError(f"{type(model).__name__} has no `model.layers` decoder stack; gated-LoRA MTP supports "
                               "Llama / Qwen2 / Gemma3-style causal LMs.")
    return layers


def apply_gated_lora(model, rank: int, alpha: float, target_modules=DEFAULT_TARGET_MODULES,
                     gate: LoRAGate | None = None) -> dict[str, GatedLoRALinear]:
    """Replace, in every decoder layer of ``model``, the ``nn.Linear`` children named in ``target_modules`` (attention
    and MLP projections; never the embeddings or ``lm_head``, which are outside the decoder layers) by
    ``GatedLoRALinear`` layers sharing one ``LoRAGate`` (``gate``, or a new one).

    Returns the new layers by their qualified names in ``model``; their common gate is ``layer.gate``.
    """
    targets = set(target_modules)
    if not targets:
        raise ValueError("target_modules is empty: name the decoder linears to adapt, e.g. "
                         f"{list(DEFAULT_TARGET_MODULES)}.")
    gate = gate if gate is not None else LoRAGate()
    prefix = {id(module): name for name, module in model.named_modules()}
    gated: dict[str, GatedLoRALinear] = {}
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if child_name not in targets:
                    continue
                if isinstance(child, GatedLoRALinear):
                    raise UnsupportedError("This model already has gated LoRA layers; build MTPModel on a fresh base.")
                wrapped = GatedLoRALinear(child, rank, alpha, gate)
                setattr(parent, child_name, wrapped)
                gated[f"{prefix[id(parent)]}.{child_name}"] = wrapped
    missing = targets - {name.rsplit(".", 1)[-1] for name in gated}
    if missing:
        raise UnsupportedError(f"No nn.Linear named {sorted(missing)} in the decoder layers of {type(model).__name__}; "
                               f"pass target_modules among the names it has (Llama / Qwen2 / Gemma3: "
                               f"{list(DEFAULT_TARGET_MODULES)}).")
    return gated
