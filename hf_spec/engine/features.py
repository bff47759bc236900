"""Target features: the hidden states of chosen target layers, captured during forwards the engine runs anyway.

Feature-level drafters read them: Medusa and Falcon the last hidden state after the final norm, Clover-2
the last one before it, EAGLE-3 a low, a middle and a high layer (Li et al. 2025, "EAGLE-3:
Scaling up Inference Acceleration of Large Language Models via Training-Time Test").

Layer names follow transformers' ``output_hidden_states`` indexing, always *before* the final norm:
``0`` is the embedding output, ``i`` the input of decoder layer ``i`` (the output of layer ``i - 1``),
``num_layers`` the output of the last layer; negative indices count from ``num_layers + 1`` (``-1`` is
the last layer, pre-norm). ``FINAL`` (``"final"``) is the last hidden state *after* the final norm,
what the LM head reads. Capture uses forward hooks on the decoder layers and the final norm, so the
meaning does not depend on how a transformers version fills ``hidden_states`` (5.23 puts the
post-norm state last) and only the requested layers are kept.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import UnsupportedError

FINAL = "final"


def decoder_parts(model) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.nn.Module | None]:
    """The decoder of a causal LM, its list of layers and its final norm (``None`` if it has none)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UnsupportedError(f"{type(decoder).__name__} has no `layers` list; hf_spec cannot capture its features.")
    return decoder, layers, getattr(decoder, "norm", None)


def resolve_layers(model, layers) -> tuple:
    """Normalise layer names (negative indices made absolute, ``FINAL`` kept); bad names raise ``UnsupportedError``."""
    _, decoder_layers, norm = decoder_parts(model)
    count = len(decoder_layers)
    resolved = []
    for layer in layers:
        if layer == FINAL:
            if norm is None:
                raise UnsupportedError(f"{type(model).__name__} has no final norm module named `norm`.")
            resolved.append(FINAL)
            continue
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(count + 1) <= layer <= count:
            raise UnsupportedError(f"Feature layer {layer!r} is not {FINAL!r} or an output_hidden_states index in "
                                   f"[{-(count + 1)}, {count}] for this {count}-layer target.")
        index = layer % (count + 1)
        if index == count and norm is None:
            raise UnsupportedError(f"{type(model).__name__} has no final norm module named `norm`; its pre-norm last "
                                   f"layer cannot be captured (use {FINAL!r}).")
        resolved.append(index)
    if len(set(map(str, resolved))) != len(resolved):
        raise UnsupportedError(f"Feature layers {list(layers)} name the same layer twice.")
    return tuple(resolved)


@contextmanager
def capture_features(model, layers: tuple):
    """While active, forwards of ``model`` record the resolved ``layers``; read them with ``store.features()``.

    ``store.features()`` is ``(batch, length, len(layers) * hidden)``, the layers concatenated in
    the order asked for (EAGLE-3 fuses three layers with one linear map over that concatenation).
    """
    store = _FeatureStore(layers)
    if not layers:
        yield store
        return
    _, decoder_layers, norm = decoder_parts(model)
    count = len(decoder_layers)
    handles = []
    for layer in layers:
        if layer == FINAL:
            handles.append(norm.register_forward_hook(store.output_hook(layer)))
        else:
            module = norm if layer == count else decoder_layers[layer]
            handles.append(module.register_forward_pre_hook(store.input_hook(layer), with_kwargs=True))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


class _FeatureStore:
    def __init__(self, layers: tuple):
        self.layers = layers
        self.captured: dict = {}

    def input_hook(self, layer):
        def hook(module, args, kwargs):
            self.captured[layer] = args[0] if args else kwargs["hidden_states"]
        return hook

    def output_hook(self, layer):
        def hook(module, args, output):
            self.captured[layer] = output
        return hook

    def features(self) -> torch.Tensor | None:
        if not self.layers:
            return None
        missing = [layer for layer in self.layers if layer not in self.captured]
        if missing:
            raise UnsupportedError(f"The target's forward never reached feature layers {missing}.")
        return torch.cat([self.captured[layer] for layer in self.layers], dim=-1)
