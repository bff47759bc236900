"""Export an ``Eagle3Draft`` as a ``speculators`` EAGLE-3 checkpoint, the format vLLM serves.

``speculators`` (vllm-project/speculators; this writes the format of version 0.9.0) stores an EAGLE-3 draft as a
folder holding ``config.json`` and ``model.safetensors``. vLLM reads it with ``--speculative-config
'{"model": "<folder>", "method": "eagle3"}'``, and ``speculators.models.eagle3.Eagle3DraftModel.from_pretrained``
loads it for fine-tuning or evaluation.

``config.json`` holds ``speculators_model_type: "eagle3"``, ``architectures: ["Eagle3Speculator"]``, and
``speculators_config`` with the algorithm, a greedy proposal of ``speculative_tokens`` tokens and the verifier
(``name_or_path`` + ``architectures``). ``transformer_layer_config`` is a Llama config describing the draft layer.
The other fields are:

=====================================  ============================================================
speculators                            hf_spec
=====================================  ============================================================
transformer_layer_config.hidden_size,  ``Eagle3Config`` fields of the same names (the target's),
num_attention_heads,                   ``num_hidden_layers: 1``, no biases, ``hidden_act: silu``
num_key_value_heads, head_dim,
intermediate_size, rms_norm_eps
transformer_layer_config.rope_*        ``rope_theta`` as plain RoPE (``rope_type: default``; hf_spec's layer applies
                                       no rope scaling, whatever the target does). Written as
                                       ``rope_parameters`` (transformers 5) and ``rope_theta`` (transformers 4).
transformer_layer_config.vocab_size    ``vocab_size`` (the target's); ``max_position_embeddings`` is the
                                       verifier's (vLLM sizes the draft's rotary table and max length by it)
draft_vocab_size                       ``draft_vocab_size``, or ``vocab_size`` for the whole vocabulary
eagle_aux_hidden_state_layer_ids       ``feature_layers``, sorted (see below)
norm_before_residual: false            the residual is the un-normed hidden state, as in ``DraftLayer``
speculative_tokens (greedy proposal)   ``tree_depth`` (vLLM's default ``num_speculative_tokens``)
=====================================  ============================================================

Weights: ``fc.weight``; ``layers.0.input_layernorm.weight`` (hf_spec's ``embedding_norm``),
``layers.0.hidden_norm.weight``, ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
``layers.0.post_attention_layernorm.weight`` (``post_attention_norm``), ``layers.0.mlp.{gate,up,down}_proj.weight``;
``norm.weight``; ``lm_head.weight``; with a draft vocabulary, ``d2t`` and ``t2d``.

Conventions checked against speculators 0.9.0 and vLLM:

- ``d2t`` (int64, ``N``) holds offsets, ``target id = draft id + d2t[draft id]`` (vLLM's ``compute_logits``
  scatters draft logits to ``arange(N) + d2t``), and ``t2d`` (bool, ``V``) marks the target ids kept (speculators
  selects the verifier's lm_head rows with it; vLLM ignores it). ``DraftVocabulary`` already stores exactly
  these. Without a draft vocabulary neither tensor is written: speculators then has no mapping buffers and vLLM
  uses zero offsets.
- Layer ids: speculators and vLLM name an auxiliary hidden state by the decoder layer whose *input* it is
  (vLLM collects ``hidden_states + residual`` before running layer ``i``), i.e. ``output_hidden_states[i]``,
  the same indices as hf_spec's ``feature_layers``: no shift. vLLM concatenates them in increasing layer order,
  so the ids are written sorted and ``fc``'s input columns permuted to match. Id ``num_layers`` (the last layer's
  pre-norm output) is valid in speculators; whether a vLLM build collects it depends on the target's model code.
- Positions: speculators trains with ``position_ids = 1 + t`` for the row pairing the target's features at ``t``
  with token ``t + 1``; hf_spec and vLLM use ``t``. RoPE scores depend only on position differences, so the
  uniform offset changes nothing.
- Token embeddings are not stored: speculators lists ``embed_tokens.weight`` among the keys it may miss and loads
  the verifier's table (``load_verifier_weights``), and vLLM shares the target's embedding when the draft ships
  none. Both use the raw ``embed_tokens`` table, which is what hf_spec's drafter reads for Llama/Qwen-style
  targets; a target whose embedding module scales its output (Gemma's ``sqrt(hidden_size)``) drafts with scaled
  embeddings in hf_spec and unscaled ones there.

What the format has no field for, and is therefore not exported: the dynamic tree's ``tree_top_k`` and
``tree_budget`` (only the depth, as ``speculative_tokens``), the measured ``step_top1``, ``base_model`` (the
verifier's ``name_or_path`` is given instead), the draft vocabulary's selection metadata (``draft_vocab.json``),
and ``logit_softcapping`` (a draft for a soft-capped target is refused: the format's logits are ``lm_head(norm(h))``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import UnsupportedError
from ...training.hub import save_weights_and_config
from .model import Eagle3Draft

SPECULATORS_VERSION = "0.9.0"

# speculators name -> hf_spec name, inside the single draft decoder layer
_LAYER_NAMES = {
    "input_layernorm": "embedding_norm",
    "hidden_norm": "hidden_norm",
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "post_attention_layernorm": "post_attention_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def export_speculators(draft: Eagle3Draft, save_directory: str | Path, *, verifier_name_or_path: str,
                       verifier_architectures: list[str] | None = None,
                       max_position_embeddings: int | None = None) -> Path:
    """Write ``draft`` into ``save_directory`` as a speculators EAGLE-3 checkpoint (``model.safetensors`` then
    ``config.json``, each atomically) and return the folder.

    Args:
        verifier_name_or_path: the target as vLLM / speculators should load it (Hub id or path).
        verifier_architectures, max_position_embeddings: the target's; read from its ``config.json``
            (``verifier_name_or_path``, local or Hub) when not given.
    """
    config = draft.config
    if config.logit_softcapping:
        raise UnsupportedError("The speculators EAGLE-3 format has no logit soft-capping; this draft (for a "
                               "soft-capped target) cannot be exported without changing its logits.")
    if len(set(config.feature_layers)) != len(config.feature_layers):
        raise UnsupportedError(f"feature_layers {config.feature_layers} repeat a layer; the speculators format "
                               "names each auxiliary layer once.")
    if verifier_architectures is None or max_position_embeddings is None:
        verifier = _verifier_config(verifier_name_or_path)
        if verifier_architectures is None:
            verifier_architectures = list(verifier.get("architectures") or [])
        if max_position_embeddings is None:
            max_position_embeddings = (verifier.get("text_config") or verifier).get("max_position_embeddings")
    return save_weights_and_config(
        save_directory, speculators_state_dict(draft),
        speculators_config(draft, verifier_name_or_path, verifier_architectures, max_position_embeddings),
        metadata={"format": "pt"})


def speculators_state_dict(draft: Eagle3Draft) -> dict[str, torch.Tensor]:
    """The draft's tensors under speculators' names (``fc`` columns in increasing feature-layer order)."""
    hidden = draft.config.hidden_size
    order = sorted(range(len(draft.config.feature_layers)), key=draft.config.feature_layers.__getitem__)
    fc = draft.fc.weight.detach().view(hidden, len(order), hidden)[:, order].reshape(hidden, -1)
    tensors = {"fc.weight": fc, "norm.weight": draft.norm.weight.detach(),
               "lm_head.weight": draft.lm_head.weight.detach()}
    layer = dict(draft.layer.named_parameters())
    for name, ours in _LAYER_NAMES.items():
        tensors[f"layers.0.{name}.weight"] = layer[f"{ours}.weight"].detach()
    vocabulary = draft.draft_vocab
    if vocabulary is not None and vocabulary.size < vocabulary.target_vocab_size:
        tensors["d2t"], tensors["t2d"] = vocabulary.d2t, vocabulary.t2d
    return tensors


def speculators_config(draft: Eagle3Draft, verifier_name_or_path: str, verifier_architectures: list[str],
                       max_position_embeddings: int | None) -> dict:
    """``config.json`` of the export, as speculators' ``Eagle3SpeculatorConfig`` serialises it."""
    config = draft.config
    layer = {
        "model_type": "llama", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }
    if max_position_embeddings is not None:
        layer["max_position_embeddings"] = int(max_position_embeddings)
    return {
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "architectures": ["Eagle3Speculator"],
        "transformer_layer_config": layer,
        "draft_vocab_size": config.draft_vocab_size or config.vocab_size,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": sorted(config.feature_layers),
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": config.tree_depth,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name_or_path, "architectures": list(verifier_architectures)},
        },
    }


def _verifier_config(name_or_path: str) -> dict:
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(name_or_path)[0]
    except OSError as error:
        raise UnsupportedError(f"Cannot read the verifier's config.json from {name_or_path!r} ({error}); pass "
                               "verifier_architectures= and max_position_embeddings= explicitly.") from error
