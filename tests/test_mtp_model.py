"""Gated-LoRA MTP (Samragh et al. 2025, "Your LLM Knows the Future"), the model side: the gate leaves the base model's
next-token outputs bit-identical (with a negative control), the training layout against a brute-force reference and
against running each mask block on its own prefix, initialisation, and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from hf_spec.drafters.mtp import (
    IGNORE_INDEX,
    GatedLoRALinear,
    LoRAGate,
    MTPConfig,
    MTPModel,
    apply_gated_lora,
    build_layout,
    every_anchor,
)
from hf_spec.drafters.mtp.model import capture_final_hidden, layout_attention_mask
from hf_spec.errors import UnsupportedError
from hf_spec.training.hub import CheckpointError
from tests.conftest import tiny_model, tiny_prompt

ARCHS = ["llama", "qwen2", "gemma3"]
K = 3

pytestmark = pytest.mark.usefixtures("single_thread")


def trained_looking(arch: str, seed: int = 0, num_masks: int = K, **overrides) -> MTPModel:
    """An MTP model on a float32 tiny base with random nonzero LoRA B, mask embeddings and sampler (as if trained)."""
    model = MTPModel.for_base(tiny_model(arch, seed=seed, dtype=torch.float32, **overrides), num_mask_tokens=num_masks,
                              lora_rank=4, lora_alpha=8.0, sampler_hidden_size=24)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


# ---------------------------------------------------------------------------- layout
def reference_layout(length: int, k: int, anchors: list[int], tokens: list[int]):
    """From the definition, by loops: the rows, their positions, labels, and who may attend to whom."""
    rows = []
    for i in range(length):
        rows.append(("token", i, None))
        if i in anchors:
            rows.extend(("mask", i, j) for j in range(k))

    def allowed(query, key):
        if key[0] == "token":
            return key[1] <= query[1]  # an ordinary key up to the query's own position / its block's anchor
        return query[0] == "mask" and key[1] == query[1] and key[2] <= query[2]  # own block, causally

    def label(index):
        return tokens[index] if index < length else IGNORE_INDEX

    positions = [i if kind == "token" else i + 1 + j for kind, i, j in rows]
    labels = [label(i + 1) if kind == "token" else label(i + 2 + j) for kind, i, j in rows]
    sampler = [label(i + 1) if kind == "token" else label(i + 1 + j) for kind, i, j in rows]
    pattern = [[allowed(query, key) for key in rows] for query in rows]
    return rows, positions, labels, sampler, pattern


@pytest.mark.parametrize("length,k,anchors", [(1, 1, [0]), (6, 2, []), (6, 2, [0]), (7, 3, [1, 2, 6]),
                                              (9, 4, [0, 3, 4, 8]), (8, 2, every_anchor(8))])
def test_layout_matches_brute_force_reference(length, k, anchors):
    tokens = list(range(10, 10 + length))
    rows, positions, labels, sampler, pattern = reference_layout(length, k, anchors, tokens)
    layout = build_layout(length, k, list(reversed(anchors)))  # anchor order does not matter
    ids = torch.tensor([tokens])
    assert layout.num_rows == len(rows) == length + k * len(anchors)
    assert layout.token_ids(ids)[0].tolist() == [tokens[i] if kind == "token" else -1 - j for kind, i, j in rows]
    assert layout.position_ids.tolist() == positions
    assert layout.labels(ids)[0].tolist() == labels
    assert layout.sampler_inputs(ids)[0].tolist() == sampler
    assert layout.allowed.tolist() == pattern
    assert layout.ordinary_rows.tolist() == [r for r, row in enumerate(rows) if row[0] == "token"]
    for a, p in enumerate(sorted(anchors)):
        assert layout.mask_rows[a].tolist() == [rows.index(("mask", p, j)) for j in range(k)]


def test_layout_labels_convention_and_padding():
    """Row p predicts x_{p+1}; slot j after p predicts x_{p+2+j}; padding and the end give IGNORE_INDEX."""
    layout = build_layout(6, 2, [1])
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    labels = layout.labels(ids)[0]
    assert labels[layout.ordinary_rows].tolist() == [11, 12, 13, 14, 15, IGNORE_INDEX]
    assert labels[layout.mask_rows[0]].tolist() == [13, 14]
    assert layout.sampler_inputs(ids)[0][layout.mask_rows[0]].tolist() == [12, 13]
    valid = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert layout.labels(ids, valid)[0][layout.mask_rows[0]].tolist() == [13, IGNORE_INDEX]


@pytest.mark.parametrize("anchors", [[0, 0], [-1], [5]])
def test_layout_rejects_bad_anchors(anchors):
    with pytest.raises(ValueError, match="distinct positions"):
        build_layout(5, 2, anchors)


# ---------------------------------------------------------------------------- the gate
def test_gated_layer_is_the_base_layer_where_closed_even_with_a_non_finite_adapter():
    base = torch.nn.Linear(8, 6).double()
    layer = GatedLoRALinear(base, rank=2, alpha=4.0, gate=LoRAGate())
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    x[0, 0] = 0.0
    gate = torch.zeros(2, 5, dtype=torch.bool)
    gate[1, 2:] = True
    with layer.gate.open(gate):
        out = layer(x)
    assert torch.equal(out[~gate], base(x)[~gate])  # `base + 0 * lora` would be NaN there
    assert not torch.isfinite(out[gate]).any()
    assert torch.equal(layer(x), base(x))  # gate closed outside the block


@pytest.mark.parametrize("gated_rows", [[7, 8, 9], [1, 7, 9]], ids=["contiguous", "scattered"])
def test_gated_layer_adds_the_lora_term_on_gated_rows_with_gradients(gated_rows):
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6).double().requires_grad_(False)
    layer = GatedLoRALinear(base, rank=2, alpha=4.0, gate=LoRAGate())
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    gate = torch.zeros(10, dtype=torch.bool)
    gate[gated_rows] = True
    gate = gate.view(2, 5)
    with layer.gate.open(gate):
        assert (layer.gate.span is not None) == (gated_rows == [7, 8, 9])
        out = layer(x)
    expected = base(x) + gate.unsqueeze(-1) * (x @ layer.lora_A.T @ layer.lora_B.T) * 2.0
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[~gate], base(x)[~gate])
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, layer.lora_A, layer.lora_B])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, layer.lora_A, layer.lora_B])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_gated_lora_wraps_decoder_linears_only(arch):
    model = tiny_model(arch, dtype=torch.float32)
    ids = tiny_prompt(length=9)
    before = model(ids).logits
    gated = apply_gated_lora(model, rank=2, alpha=2.0)
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(gated) == len(per_layer) * model.config.num_hidden_layers
    assert {name.rsplit(".", 1)[-1] for name in gated} == per_layer
    assert all(".layers." in name for name in gated)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert len({id(layer.gate) for layer in gated.values()}) == 1
    for layer in gated.values():
        torch.nn.init.normal_(layer.lora_B)
    assert torch.equal(model(ids).logits, before)  # gate closed: the base model exactly
    with pytest.raises(UnsupportedError, match="already has gated LoRA"):
        apply_gated_lora(model, rank=2, alpha=2.0)
    with pytest.raises(UnsupportedError, match="No nn.Linear named"):
        apply_gated_lora(tiny_model(arch), rank=2, alpha=2.0, target_modules=["c_attn"])


@pytest.mark.parametrize("arch", ARCHS)
def test_ordinary_rows_are_bit_identical_to_the_base_with_negative_control(arch):
    model = trained_looking(arch)
    ids = torch.cat([tiny_prompt(seed=1, length=12), tiny_prompt(seed=2, length=12)])
    anchors = [0, 2, 3, 7, 11]
    with torch.no_grad():
        gated = model.forward_layout(ids, anchors)
        plain = model.forward_layout(ids, anchors, gate="none")
        everywhere = model.forward_layout(ids, anchors, gate="all")
    assert torch.equal(gated.logits, plain.logits)
    assert torch.equal(gated.hidden, plain.hidden)
    pristine = tiny_model(arch, dtype=torch.float32)  # never wrapped: same weights, same layout inputs
    layout = gated.layout
    with torch.no_grad():
        reference = pristine(inputs_embeds=model.embed(layout.token_ids(ids)),
                             position_ids=layout.position_ids.expand(2, -1),
                             attention_mask=layout_attention_mask(pristine, layout.allowed, torch.float32),
                             use_cache=False).logits
    assert torch.equal(gated.logits, reference[:, layout.ordinary_rows])
    assert not torch.equal(gated.mask_logits, plain.mask_logits)  # the adapter acts on the mask rows
    assert (everywhere.logits - plain.logits).abs().max() > 1e-3  # control: an ungated adapter changes next tokens
    # and the layout shows each ordinary row exactly its own prefix: the plain sequence's logits (up to kernel order)
    torch.testing.assert_close(gated.logits, model.base(ids).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- one forward = each block on its prefix
def separate_block_logits(model: MTPModel, ids: torch.Tensor, anchor: int):
    """Mask-row latents and logits of prefix ``ids[:, :anchor + 1]`` + one mask block at its end, run through the
    model's own causal (and sliding-window) masks: no layout code involved."""
    k = model.config.num_mask_tokens
    tokens = torch.cat([ids[:, :anchor + 1], (-1 - torch.arange(k)).expand(ids.shape[0], -1)], dim=1)
    gate = torch.zeros(tokens.shape, dtype=torch.bool)
    gate[:, -k:] = True
    with model.gate.open(gate), capture_final_hidden(model.base) as hidden:
        logits = model.base(inputs_embeds=model.embed(tokens), use_cache=False).logits
    return hidden[0][:, -k:], logits[:, -k:]


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen2", {}), ("gemma3", {}),
                                            ("gemma3", {"sliding_window": 4})])
def test_interleaved_blocks_equal_each_block_run_on_its_own_prefix(arch, overrides):
    model = trained_looking(arch, **overrides)
    ids = torch.cat([tiny_prompt(seed=3, length=11), tiny_prompt(seed=4, length=11)])
    anchors = [1, 4, 5, 10]
    with torch.no_grad():
        out = model.forward_layout(ids, anchors)
        for a, anchor in enumerate(anchors):
            hidden, logits = separate_block_logits(model, ids, anchor)
            torch.testing.assert_close(out.mask_hidden[:, a], hidden, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.mask_logits[:, a], logits, rtol=0, atol=1e-5)
            previous = ids[:, anchor + 1:anchor + 1 + K]
            previous = torch.cat([previous, previous.new_zeros(2, K - previous.shape[1])], dim=1)
            torch.testing.assert_close(out.sampler_logits[:, a], model.sampler_logits(previous, hidden),
                                       rtol=0, atol=1e-5)


def test_forward_layout_takes_right_padding_only():
    model = trained_looking("llama")
    ids = tiny_prompt(length=8).expand(2, -1)
    padding = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        out = model.forward_layout(ids, [1, 3], attention_mask=padding)
    assert out.labels[1].tolist()[4:] == [IGNORE_INDEX] * 4
    assert out.mask_labels[1, 1].tolist() == [IGNORE_INDEX] * K  # slots after 3 predict x_5.. (padding)
    assert out.mask_labels[0, 1].tolist() == ids[0, 5:8].tolist()
    with pytest.raises(UnsupportedError, match="right-padded"):
        model.forward_layout(ids, [1], attention_mask=padding.flip(-1))


# ---------------------------------------------------------------------------- shapes and initialisation
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_model_shapes_and_initialisation(arch):
    base = tiny_model(arch, dtype=torch.float32)
    model = MTPModel.for_base(base, num_mask_tokens=K, lora_rank=4, lora_alpha=8.0, sampler_hidden_size=24)
    hidden = base.config.hidden_size
    embedding = base.get_input_embeddings()
    scale = float(getattr(embedding, "embed_scale", 1.0))
    assert model.config.model_type == base.config.model_type
    assert model.config.vocab_size == 96 and model.config.hidden_size == hidden
    assert model.mask_embeddings.shape == (K, hidden) and model.mask_embeddings.requires_grad
    torch.testing.assert_close(model.mask_embeddings, (embedding.weight.mean(0) * scale).expand(K, -1))
    assert model.sampler[0].weight.shape == (24, 2 * hidden) and model.sampler[2].weight.shape == (hidden, 24)
    assert not model.sampler[2].weight.any() and not model.sampler[2].bias.any()
    for layer in model.gated_layers.values():
        assert layer.lora_A.shape == (4, layer.base_layer.in_features) and layer.lora_A.any()
        assert layer.lora_B.shape == (layer.base_layer.out_features, 4) and not layer.lora_B.any()
        assert layer.scaling == 2.0
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == set(model.adapter_state_dict())
    assert not any(name.startswith("base.") and not name.endswith(("lora_A", "lora_B")) for name in trainable)
    with torch.no_grad():
        out = model.forward_layout(tiny_prompt(length=7), [0, 4])
    assert out.logits.shape == (1, 7, 96) and out.mask_logits.shape == out.sampler_logits.shape == (1, 2, K, 96)
    assert out.mask_hidden.shape == (1, 2, K, hidden) and out.hidden.shape == (1, 7, hidden)
    torch.testing.assert_close(out.sampler_logits, out.mask_logits)  # a fresh residual sampler = the base head


def test_adapter_gets_gradients_and_base_does_not():
    model = trained_looking("llama")
    out = model.forward_layout(tiny_prompt(length=8), [0, 3])
    (out.mask_logits.square().mean() + out.sampler_logits.square().mean()).backward()
    assert all(parameter.grad is not None for parameter in model.trainable_parameters())
    assert all(parameter.grad is None for name, parameter in model.named_parameters()
               if name not in model.adapter_state_dict())


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model = trained_looking(arch)
    folder = model.save_pretrained(tmp_path / "mtp")
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["method"] == "mtp" and config["model_type"] == model.base.config.model_type
    assert config["num_mask_tokens"] == K
    loaded = MTPModel.from_pretrained(folder, tiny_model(arch, dtype=torch.float32))
    assert loaded.config == model.config
    for name, tensor in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[name], tensor)
    ids = tiny_prompt(length=9)
    with torch.no_grad():
        expected, got = model.forward_layout(ids, [2, 5]), loaded.forward_layout(ids, [2, 5])
    assert torch.equal(expected.mask_logits, got.mask_logits) and torch.equal(expected.sampler_logits,
                                                                              got.sampler_logits)


@pytest.mark.parametrize("arch,overrides,message", [("llama", {}, "model type 'qwen2'"),
                                                    ("qwen2", {"hidden_size": 48}, "hidden size 32"),
                                                    ("qwen2", {"vocab_size": 100}, "vocabulary 96"),
                                                    ("qwen2", {"num_hidden_layers": 3}, "2 layers")])
def test_loading_onto_another_base_is_refused(arch, overrides, message, tmp_path):
    folder = trained_looking("qwen2").save_pretrained(tmp_path / "mtp")
    with pytest.raises(UnsupportedError, match=message):
        MTPModel.from_pretrained(folder, tiny_model(arch, dtype=torch.float32, **overrides))


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    model = trained_looking("llama")
    folder = model.save_pretrained(tmp_path / "mtp")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "lora_rank": 8}))
    with pytest.raises(CheckpointError, match="has shape"):
        MTPModel.from_pretrained(folder, tiny_model("llama", dtype=torch.float32))
    with pytest.raises(CheckpointError, match="not gated-LoRA MTP"):
        MTPConfig.from_dict({**config, "method": "eagle3"})
    with pytest.raises(CheckpointError, match="Unknown MTP config keys"):
        MTPConfig.from_dict({**config, "heads": 3})
