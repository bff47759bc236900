"""``MTPModel``: a causal LM that also predicts ``k`` tokens beyond the next one (Samragh et al. 2025, "Your LLM Knows
the Future: Uncovering Its Multi-Token Prediction Potential").

Parts (only the last three are trained and saved; the base model is frozen and never stored):

- the base causal LM, whose decoder linears are wrapped in place by gated LoRA layers (``gate.py``): with the gate
  closed the wrapped model *is* the base model, bit for bit, so one object serves as verifier and drafter;
- ``mask_embeddings`` ``(k, hidden)``: the input embeddings of mask slots ``0 .. k-1``, all initialised to the mean
  of the base's input embedding rows (times Gemma's embedding scale), i.e. to the "average token";
- ``sampler``: a 2-layer MLP over ``concat(E[y_prev], z)``, the base's (frozen) input embedding of the token sampled
  just before a mask slot and that slot's last hidden state (the residual stream *before* the final norm), back to
  the hidden size; its output goes through the base's final norm and ``lm_head`` (and Gemma's logit soft-capping),
  as the base's own hidden states do. With ``sampler_residual`` (default) the MLP's output is added to ``z`` and its
  last layer starts at zero, so an untrained sampler reproduces the base head on the mask latent;
- the gated LoRA ``A``/``B`` matrices.

``forward_layout`` runs the paper's training layout (``layout.py``) in one forward: base next-token logits on the
ordinary rows (the gate is closed there: they equal the base model's), and the mask rows' latents, their logits
through the base head (mask prediction) and the sampler's logits (teacher-forced on the true previous token).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...engine.target import _additive, _sliding_pattern
from ...errors import UnsupportedError
from ...training.hub import (
    CheckpointError,
    load_config_dict,
    load_weights,
    push_folder_to_hub,
    resolve_pretrained,
    save_weights_and_config,
)
from ..persistence import target_head_shape
from .config import MTPConfig
from .gate import GatedLoRALinear, LoRAGate, apply_gated_lora
from .layout import MTPLayout, build_layout

__all__ = ["MTPConfig", "MTPModel", "MTPOutput", "layout_attention_mask"]

RECIPE_HINT = "train an MTP adapter for this base model (hf_spec.drafters.mtp)"


@dataclass
class MTPOutput:
    """What ``MTPModel.forward_layout`` returns (``B`` batch, ``n`` tokens, ``A`` blocks, ``k`` slots, ``V`` vocab).

    Attributes:
        layout: the extended sequence that was run.
        logits: ``(B, n, V)`` next-token logits of the ordinary rows (the base model's: the gate is closed there).
        labels: ``(B, n)`` their targets ``x_{i+1}`` (``IGNORE_INDEX`` past the end / on padding).
        hidden: ``(B, n, H)`` the ordinary rows' last hidden states (before the final norm).
        mask_hidden: ``(B, A, k, H)`` the mask rows' last hidden states ``z`` (before the final norm).
        mask_logits: ``(B, A, k, V)`` the base head on ``z`` (the paper's mask-token prediction).
        mask_labels: ``(B, A, k)`` targets of slot ``j`` after ``p``: ``x_{p+2+j}``.
        sampler_logits: ``(B, A, k, V)`` the sampler head's logits, fed ``x_{p+1+j}``; ``None`` if not asked for.
    """

    layout: MTPLayout
    logits: torch.Tensor
    labels: torch.Tensor
    hidden: torch.Tensor
    mask_hidden: torch.Tensor
    mask_logits: torch.Tensor
    mask_labels: torch.Tensor
    sampler_logits: torch.Tensor | None


class MTPModel(nn.Module):
    """A frozen base causal LM + gated LoRA + ``k`` mask embeddings + a sampler head (Samragh et al. 2025).

    Building one wraps the base model's decoder linears in place (see ``gate.py``); keep using ``mtp.base`` as the
    plain model: while no gate is open its outputs are the base model's exactly.
    """

    def __init__(self, base, config: MTPConfig):
        super().__init__()
        check_base(config, base)
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.config = config
        self.base = base
        self.gate = LoRAGate()
        self.gated_layers: dict[str, GatedLoRALinear] = apply_gated_lora(
            base, config.lora_rank, config.lora_alpha, config.target_modules, self.gate)
        weight = base.get_input_embeddings().weight
        self.mask_embeddings = nn.Parameter(mean_input_embedding(base).expand(config.num_mask_tokens, -1).clone())
        hidden, width = config.hidden_size, config.sampler_width
        self.sampler = nn.Sequential(nn.Linear(2 * hidden, width), nn.SiLU(), nn.Linear(width, hidden))
        if config.sampler_residual:
            nn.init.zeros_(self.sampler[2].weight)
            nn.init.zeros_(self.sampler[2].bias)
        self.sampler.to(device=weight.device, dtype=weight.dtype)

    @classmethod
    def for_base(cls, base, num_mask_tokens: int = 8, **config_kwargs) -> MTPModel:
        """A fresh (untrained) MTP model on ``base``, its config read off the base's."""
        text = base.config.get_text_config()
        vocab_size, hidden_size = target_head_shape(base)
        config_kwargs.setdefault("base_model", getattr(base.config, "_name_or_path", None) or None)
        config = MTPConfig(hidden_size=hidden_size, vocab_size=vocab_size, model_type=text.model_type,
                           num_hidden_layers=text.num_hidden_layers, num_mask_tokens=num_mask_tokens, **config_kwargs)
        return cls(base, config)

    # ------------------------------------------------------------------ pieces of a forward
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of an extended sequence: the base's for tokens ``>= 0``, mask slot ``j`` for ``-1 - j``."""
        is_mask = token_ids < 0
        embeddings = self.base.get_input_embeddings()(token_ids.clamp(min=0))
        if not is_mask.any():
            return embeddings
        masks = self.mask_embeddings.to(embeddings.dtype)[(-1 - token_ids).clamp(min=0)]
        return torch.where(is_mask.unsqueeze(-1), masks, embeddings)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of last hidden states (before the final norm), as the base model computes them."""
        logits = self.base.get_output_embeddings()(final_norm(self.base)(hidden))
        cap = getattr(self.base.config.get_text_config(), "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    def sampler_logits(self, previous_tokens: torch.Tensor, mask_hidden: torch.Tensor) -> torch.Tensor:
        """The sampler head: logits of the next token of a mask slot from ``concat(E[previous token], z)``.

        ``previous_tokens`` ``(...)``: the token sampled just before the slot (negative values are treated as 0, for
        positions whose logits are ignored); ``mask_hidden`` ``(..., H)``: the slot's last hidden state ``z``.
        """
        previous = self.base.get_input_embeddings()(previous_tokens.clamp(min=0)).to(mask_hidden.dtype)
        update = self.sampler(torch.cat([previous, mask_hidden], dim=-1))
        return self.unembed(mask_hidden + update if self.config.sampler_residual else update)

    def forward(self, input_ids: torch.Tensor, mask_after, attention_mask: torch.Tensor | None = None,
                with_sampler: bool = True, gate: str = "mask") -> MTPOutput:
        """``forward_layout`` through the module's ``__call__``, so that module hooks run around it: DeepSpeed ZeRO-3
        gathers a module's own parameters (here ``mask_embeddings``) only around that module's forward."""
        return self.forward_layout(input_ids, mask_after, attention_mask, with_sampler=with_sampler, gate=gate)

    def forward_layout(self, input_ids: torch.Tensor, mask_after, attention_mask: torch.Tensor | None = None,
                       with_sampler: bool = True, gate: str = "mask") -> MTPOutput:
        """One forward over ``input_ids`` ``(B, n)`` with a block of ``k`` mask tokens after each position in
        ``mask_after`` (the paper's masked-input training layout, ``layout.build_layout``), the LoRA gate open on
        the mask rows only.

        ``attention_mask`` ``(B, n)`` is a *right*-padding mask (1 = real token): padded positions only lose their
        labels (real rows never see later positions, and every row keeps its own layout). Left padding would shift
        positions and is refused.

        ``gate`` opens the LoRA on ``"mask"`` rows (the model), on no row (``"none"``: the base model on the same
        layout) or on ``"all"`` rows (a control: the ordinary rows then stop being the base model's).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
        valid = _right_padding(attention_mask, input_ids)
        batch, length = input_ids.shape
        layout = build_layout(length, self.config.num_mask_tokens, mask_after, device=input_ids.device)
        token_ids = layout.token_ids(input_ids)
        positions = layout.position_ids.unsqueeze(0).expand(batch, -1)
        mask = layout_attention_mask(self.base, layout.allowed, self.base.dtype)
        with self.gate.open(_gate_rows(gate, layout, batch)), capture_final_hidden(self.base) as hidden:
            outputs = self.base(inputs_embeds=self.embed(token_ids), position_ids=positions, attention_mask=mask,
                                use_cache=False)
        latents, logits = hidden[0], outputs.logits
        labels = layout.labels(input_ids, valid)
        ordinary, masks = layout.ordinary_rows, layout.mask_rows
        mask_hidden = latents[:, masks]
        sampler = None
        if with_sampler:
            sampler = self.sampler_logits(layout.sampler_inputs(input_ids, valid)[:, masks], mask_hidden)
        return MTPOutput(layout=layout, logits=logits[:, ordinary], labels=labels[:, ordinary],
                         hidden=latents[:, ordinary], mask_hidden=mask_hidden, mask_logits=logits[:, masks],
                         mask_labels=labels[:, masks], sampler_logits=sampler)

    # ------------------------------------------------------------------ persistence
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only: mask embeddings, sampler, LoRA ``A`` / ``B`` (never the base model)."""
        return {name: tensor for name, tensor in self.state_dict().items() if _is_adapter_tensor(name)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for name, parameter in self.named_parameters() if _is_adapter_tensor(name)]

    def save_pretrained(self, save_directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors`` (the adapter tensors) and ``config.json`` into ``save_directory``, atomically.

        ``state_dict``: the adapter tensors to write instead of this model's (e.g. gathered from ZeRO-3 shards by the
        training recipe); it must hold exactly the names and shapes of ``adapter_state_dict()``."""
        tensors = self.adapter_state_dict()
        if state_dict is not None:  # shapes from the parameters: a ZeRO-3 partitioned one keeps its own as ds_shape
            expected = {name: tuple(getattr(parameter, "ds_shape", parameter.shape))
                        for name, parameter in self.named_parameters() if _is_adapter_tensor(name)}
            given = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
            if given != expected:
                missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
                reshaped = sorted(name for name in set(given) & set(expected) if given[name] != expected[name])
                raise ValueError(f"state_dict does not match this model's adapter tensors: missing {missing[:6]}, "
                                 f"unexpected {unexpected[:6]}, other shapes {reshaped[:6]}.")
            tensors = state_dict
        return save_weights_and_config(save_directory, tensors, self.config.to_dict(),
                                       metadata={"format": "pt", "hf_spec_method": "mtp"})

    def push_to_hub(self, repo_id: str, *, model_card: str | None = None, token: str | None = None,
                    private: bool | None = None, commit_message: str = "Upload gated-LoRA MTP adapter") -> str:
        """Save the adapter tensors and config (plus ``README.md`` = ``model_card``) and upload them as one commit.
        The base model is never uploaded, and the adapter is never merged into it (that would change its next-token
        outputs)."""
        import tempfile

        with tempfile.TemporaryDirectory() as staging:
            self.save_pretrained(staging)
            if model_card is not None:
                Path(staging, "README.md").write_text(model_card, encoding="utf-8")
            return push_folder_to_hub(staging, repo_id, token=token, private=private, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, base, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False) -> MTPModel:
        """Load an adapter (local folder or Hub repo id) onto ``base``, which must be the model it was trained for
        (``UnsupportedError`` otherwise); ``base`` is wrapped in place."""
        folder = resolve_pretrained(path_or_id, revision=revision, token=token, cache_dir=cache_dir,
                                    local_files_only=local_files_only)
        config = MTPConfig.from_dict(load_config_dict(folder))
        model = cls(base, config)
        model.load_adapter_state_dict(load_weights(folder), source=str(path_or_id))
        model.source = folder
        return model.eval()

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        expected = self.adapter_state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source} does not match its config.json: missing tensors {missing[:6]}, unexpected "
                                  f"tensors {unexpected[:6]} (corrupt or mismatched checkpoint).")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                                      f"{tuple(expected[name].shape)} (corrupt or mismatched checkpoint).")
        with torch.no_grad():
            for name, tensor in tensors.items():
                expected[name].copy_(tensor)

    def check_compatible(self, base) -> None:
        check_base(self.config, base)


# ---------------------------------------------------------------------------- helpers
def _is_adapter_tensor(name: str) -> bool:
    return name == "mask_embeddings" or name.startswith("sampler.") or name.endswith((".lora_A", ".lora_B"))


def _gate_rows(gate: str, layout: MTPLayout, batch: int) -> torch.Tensor:
    rows = {"mask": layout.is_mask, "none": torch.zeros_like(layout.is_mask), "all": torch.ones_like(layout.is_mask)}
    if gate not in rows:
        raise ValueError(f"gate must be 'mask', 'none' or 'all', got {gate!r}.")
    return rows[gate].unsqueeze(0).expand(batch, -1)


def _right_padding(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}.")
    valid = attention_mask.bool()
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise UnsupportedError("forward_layout takes right-padded batches only (a real token follows padding): "
                               "pad on the right (tokenizer.padding_side = 'right').")
    return valid


def final_norm(base) -> nn.Module:
    """The base decoder's final norm (``model.norm``), applied before ``lm_head``."""
    norm = getattr(base.get_decoder(), "norm", None)
    if not isinstance(norm, nn.Module):
        raise UnsupportedError(f"{type(base).__name__} has no final norm at `model.norm`; gated-LoRA MTP supports "
                               "Llama / Qwen2 / Gemma3-style causal LMs.")
    return norm


@contextmanager
def capture_final_hidden(base):
    """Record the input of the final norm (the last hidden states before it) during the enclosed forward."""
    store: list[torch.Tensor] = []
    handle = final_norm(base).register_forward_hook(lambda module, args, output: store.append(args[0]))
    try:
        yield store
    finally:
        handle.remove()


def mean_input_embedding(base) -> torch.Tensor:
    """The mean of the base's input embedding rows, in the units the decoder sees them (times the embedding scale
    of models such as Gemma that scale embeddings inside the embedding module)."""
    embedding = base.get_input_embeddings()
    mean = embedding.weight.detach().mean(dim=0)
    scale = getattr(embedding, "embed_scale", None)
    return mean * (scale.to(mean.dtype) if isinstance(scale, torch.Tensor) else (scale or 1.0))


def layout_attention_mask(model, allowed: torch.Tensor, dtype: torch.dtype):
    """The additive 4D mask(s) for the ``(N, N)`` pattern ``allowed`` without a cache, as the model's public forward
    takes them (like ``hf_spec.engine.target.tree_attention_masks``): one ``(1, 1, N, N)`` mask, or one per layer
    type for models with sliding-window layers (each row keeps its last ``sliding_window`` allowed keys: rows list
    their logical sequence in order, see ``layout.py``)."""
    if "flash" in str(model.config._attn_implementation):
        raise UnsupportedError("The MTP training layout needs a 4D attention mask, which flash attention cannot take; "
                               "load the model with attn_implementation='sdpa' (or 'eager').")
    config = model.config.get_text_config(decoder=True)
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types <= {"full_attention"}:
        return _additive(allowed, dtype)
    masks = {}
    for layer_type in layer_types:
        if layer_type == "full_attention":
            masks[layer_type] = _additive(allowed, dtype)
        elif layer_type == "sliding_attention":
            masks[layer_type] = _additive(_sliding_pattern(allowed, config.sliding_window), dtype)
        else:
            raise UnsupportedError(f"Layer type {layer_type!r} of {type(model).__name__} is not supported by the MTP "
                                   "training layout (only 'full_attention' and 'sliding_attention').")
    return masks


def check_base(config: MTPConfig, base) -> None:
    """``UnsupportedError`` naming every way ``base`` differs from the model ``config`` was built for."""
    text = base.config.get_text_config()
    vocab_size, hidden_size = target_head_shape(base)
    problems = []
    if text.model_type != config.model_type:
        problems.append(f"model type {config.model_type!r} (base: {text.model_type!r})")
    if hidden_size != config.hidden_size:
        problems.append(f"hidden size {config.hidden_size} (base: {hidden_size})")
    if vocab_size != config.vocab_size:
        problems.append(f"vocabulary {config.vocab_size} (base's lm_head: {vocab_size})")
    if text.num_hidden_layers != config.num_hidden_layers:
        problems.append(f"{config.num_hidden_layers} layers (base: {text.num_hidden_layers})")
    if problems:
        raise UnsupportedError(f"This MTP adapter was built for another model ({config.base_model or 'unknown base'}): "
                               f"{'; '.join(problems)}. Load it onto the model it was trained for, or {RECIPE_HINT}.")

