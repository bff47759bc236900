"""Gated-LoRA MTP decoding (Samragh et al. 2025) through ``generate(assistant_model=MTPDrafter(...))``: greedy identity
with plain ``generate()`` of the untouched base model (random adapters, a constructed adapter whose drafts are always
accepted and one whose drafts never are), the KV cache free of mask rows, the engine's appended rows against running
them on their own, the sampling distribution with a negative control, and loading / pushing by id."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

import hf_spec
from hf_spec.drafters.mtp import MTPDrafter, MTPModel
from hf_spec.engine.target import forward_tree
from hf_spec.engine.tree import DraftTree
from hf_spec.errors import UnsupportedError
from tests.conftest import tiny_model, tiny_prompt
from tests.identity import assert_greedy_identical
from tests.sampling_helpers import (
    AcceptedDepthSpy,
    accept_every_draft_token,
    exact_joint_distribution,
    joint_counts,
    peaked_tiny_llama,
    plain_logits_processors,
    sample_generations,
)
from tests.stats_helpers import chi_square_pvalue
from tests.test_hub_medusa import LocalHub, hub_env, run_python

ARCHS = ["llama", "qwen2", "gemma3"]
K = 3
MAX_NEW = 30

pytestmark = pytest.mark.usefixtures("single_thread")


def random_adapter(base, seed: int = 0, num_masks: int = K, scale: float = 0.2) -> MTPModel:
    """An MTP model on ``base`` with random nonzero adapter tensors (as if trained, but on nothing)."""
    model = MTPModel.for_base(base, num_mask_tokens=num_masks, lora_rank=4, lora_alpha=8.0, sampler_hidden_size=24)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)
    return model


def zero_layer_outputs(base):
    """``base`` with its attention and MLP output projections zeroed: every residual stream is its input embedding,
    so the next-token distribution depends on the current token only."""
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return base


def bigram_adapter(base, num_masks: int = K) -> MTPModel:
    """A constructed adapter whose drafts follow the target exactly, on a Llama base from ``zero_layer_outputs``.

    The next token is ``f(x) = lm_head(norm(E[x]))``. The mask embeddings and LoRA are zero (a mask row's latent
    is 0) and the sampler's MLP computes ``silu(e) - silu(-e) = e`` on the previous token's embedding ``e``: it
    scores ``lm_head(norm(E[y]))``, exactly the target's logits after ``y``. Greedy, slot ``j`` drafts ``f`` applied
    ``j + 1`` times: what greedy decoding does.
    """
    hidden = base.config.hidden_size
    model = MTPModel.for_base(base, num_mask_tokens=num_masks, lora_rank=4, lora_alpha=8.0,
                              sampler_hidden_size=2 * hidden)
    identity = torch.eye(hidden, dtype=base.dtype)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.zero_()
        first, second = model.sampler[0], model.sampler[2]
        first.weight[:hidden, :hidden] = identity  # e, then -e
        first.weight[hidden:, :hidden] = -identity
        second.weight[:, :hidden] = identity  # silu(e) - silu(-e)
        second.weight[:, hidden:] = -identity
    return model


def bigram_pair(seed: int = 5) -> tuple[MTPModel, torch.nn.Module]:
    """``bigram_adapter`` on a zeroed tiny Llama, and a pristine (never wrapped) copy of that base."""
    return (bigram_adapter(zero_layer_outputs(tiny_model("llama", seed=seed))),
            zero_layer_outputs(tiny_model("llama", seed=seed)))


def plain(model, prompt, max_new_tokens=MAX_NEW, **kwargs):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                          do_sample=False, **kwargs)


def speculative(model, prompt, drafter, max_new_tokens=MAX_NEW, **kwargs):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=drafter,
                          max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


# ---------------------------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("decoding", ["quadratic", "linear"])
def test_random_adapter_is_greedy_identical_to_the_untouched_base(arch, decoding):
    base, pristine = tiny_model(arch), tiny_model(arch)
    prompt = tiny_prompt(seed=1)
    drafter = MTPDrafter(random_adapter(base), decoding=decoding)
    assert_greedy_identical(pristine, plain(pristine, prompt), speculative(base, prompt, drafter))
    assert drafter.stats.drafted_tokens > 0


@pytest.mark.parametrize("num_tokens", [1, 2, 3])
def test_constructed_adapter_drafts_are_all_accepted(num_tokens):
    model, pristine = bigram_pair()
    prompt = tiny_prompt(seed=2, length=6)
    expected = plain(pristine, prompt, max_new_tokens=40)
    drafter = MTPDrafter(model, num_tokens=num_tokens)
    assert torch.equal(speculative(model.base, prompt, drafter, max_new_tokens=40), expected)
    stats = drafter.stats
    # the first step has no latents yet; then every step accepts all its drafts (but the last, cut by max_new_tokens)
    assert stats.accepted_tokens == stats.drafted_tokens
    assert stats.target_forwards == 1 + -(-(40 - 1) // (num_tokens + 1))


def make_sampler_draft_a_token_never_produced(model: MTPModel, expected: torch.Tensor) -> None:
    """The sampler's output becomes a constant vector whose argmax token is not in ``expected``."""
    weight = model.base.get_output_embeddings().weight
    norm = model.base.model.norm
    never = [token for token in range(weight.shape[0]) if token not in expected[0].tolist()
             and int((weight @ norm(weight[token])).argmax()) == token]
    with torch.no_grad():
        model.sampler[2].weight.zero_()
        model.sampler[2].bias.copy_(weight[never[0]])


def test_constructed_adapter_with_a_wrong_sampler_has_nothing_accepted():
    """Nothing accepted: the sampler's output is a constant vector whose argmax token the target never produces."""
    model, pristine = bigram_pair()
    prompt = tiny_prompt(seed=2, length=6)
    expected = plain(pristine, prompt, max_new_tokens=40)
    make_sampler_draft_a_token_never_produced(model, expected)
    drafter = MTPDrafter(model)
    assert torch.equal(speculative(model.base, prompt, drafter, max_new_tokens=40), expected)
    assert drafter.stats.drafted_tokens > 0 and drafter.stats.accepted_tokens == 0


def test_under_goodput_an_adapter_that_never_pays_costs_plain_steps():
    """Nothing accepted under the cost-aware draft length: once the policy finds no depth that pays, steps append no
    mask block (a one-row forward, as plain decoding), except around its probes; the output stays the base's."""
    model, pristine = bigram_pair()
    prompt = tiny_prompt(seed=2, length=6)
    expected = plain(pristine, prompt, max_new_tokens=80)
    make_sampler_draft_a_token_never_produced(model, expected)
    drafter = MTPDrafter(model)
    blocks = []
    appended_rows = drafter.appended_rows
    drafter.appended_rows = lambda tree, next_step_drafts=True: blocks.append(next_step_drafts) or appended_rows(
        tree, next_step_drafts)
    steep = hf_spec.CostCurve({1: 1.0, 32: 8.0})  # given, so the policy's choices do not depend on timings
    got = speculative(model.base, prompt, drafter, max_new_tokens=80, draft_length="goodput", cost_curve=steep)
    assert torch.equal(got, expected)
    assert drafter.stats.drafted_tokens > 0 and drafter.stats.accepted_tokens == 0
    assert len(blocks) == drafter.stats.target_forwards
    assert sum(blocks) <= 0.2 * len(blocks)  # the first step, and each probe with the step before it


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_mask_rows_never_enter_the_kv_cache(arch):
    base, pristine = tiny_model(arch), tiny_model(arch)
    prompt = tiny_prompt(seed=3)
    kwargs = dict(return_dict_in_generate=True)
    expected = plain(pristine, prompt, **kwargs)
    got = speculative(base, prompt, MTPDrafter(random_adapter(base, seed=3)), **kwargs)
    assert torch.equal(expected.sequences, got.sequences)
    ours, theirs = got.past_key_values, expected.past_key_values
    assert ours.get_seq_length() == theirs.get_seq_length() == got.sequences.shape[1] - 1
    for mine, reference in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(mine.keys, reference.keys, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(mine.values, reference.values, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_appended_blocks_equal_each_block_run_on_its_own_committed_prefix(arch):
    """The engine's forward with mask blocks after every block row of a chain: the block rows' logits are the base's,
    and the block after row r has the hidden states of a mask block run alone after root + the first r drafts."""
    base = tiny_model(arch)
    mtp = random_adapter(base, seed=4)
    drafter = MTPDrafter(mtp)
    context, chain = tiny_prompt(seed=4, length=9), tiny_prompt(seed=5, length=4)[0]
    tree = DraftTree.chain(chain[1:])
    cache = DynamicCache(config=base.config)
    base(context[:, :-1], past_key_values=cache, use_cache=True)
    forward = forward_tree(base, cache, chain[0], tree, (), drafter.appended_rows(tree))
    sequence = torch.cat([context[0, :-1], chain])[None]
    with torch.no_grad():
        torch.testing.assert_close(forward.logits, base(sequence).logits[0, -4:], atol=1e-10, rtol=1e-10)
    for row in range(4):
        prefix = sequence[:, : context.shape[1] + row]
        with torch.no_grad():
            alone = mtp.forward_layout(prefix, [prefix.shape[1] - 1], with_sampler=False)
        torch.testing.assert_close(drafter._blocks[row], alone.mask_hidden[0, 0], atol=1e-10, rtol=1e-10)


def test_goodput_default_and_generate_kwargs_stay_greedy_identical():
    base, pristine = tiny_model("qwen2"), tiny_model("qwen2")
    prompt = tiny_prompt(seed=6)
    kwargs = dict(repetition_penalty=1.3, no_repeat_ngram_size=3)
    drafter = MTPDrafter(random_adapter(base, seed=6))
    got = speculative(base, prompt, drafter, draft_length="goodput", **kwargs)
    assert_greedy_identical(pristine, plain(pristine, prompt, **kwargs), got)
    one = prompt[:, :1]
    assert_greedy_identical(pristine, plain(pristine, one), speculative(base, one, MTPDrafter(drafter.mtp)))


def test_misuse_gets_clear_errors():
    base = tiny_model("llama")
    mtp = random_adapter(base)
    other = tiny_model("llama")
    with pytest.raises(UnsupportedError, match="model its adapter was loaded onto"):
        speculative(other, tiny_prompt(), MTPDrafter(mtp))
    with pytest.raises(UnsupportedError, match="tree"):
        speculative(base, tiny_prompt(), MTPDrafter(mtp), tree="static")
    with pytest.raises(ValueError, match=r"num_tokens must be an integer in \[1, 3\]"):
        MTPDrafter(mtp, num_tokens=4)
    with pytest.raises(ValueError, match="decoding must be one of"):
        MTPDrafter(mtp, decoding="cubic")


# ---------------------------------------------------------------------------------------------- sampling
VOCAB = 8
SAMPLES = 400
SAMPLED_TOKENS = 3
GENERATION = dict(do_sample=True, temperature=0.7, top_k=6, repetition_penalty=1.2, max_new_tokens=4)
PROMPT = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])
SAMPLER_NOISE = 0.3


@pytest.fixture(scope="module")
def sampling_setup():
    """A peaked target whose next-token distribution depends on the current token (``zero_layer_outputs``) and the
    constructed adapter with noise on its sampler: its drafts are often, not always, accepted, at every depth."""
    mtp = bigram_adapter(zero_layer_outputs(peaked_tiny_llama(VOCAB)))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        second = mtp.sampler[2].weight
        second.add_(torch.randn(second.shape, generator=generator, dtype=second.dtype) * SAMPLER_NOISE)
    reference = zero_layer_outputs(peaked_tiny_llama(VOCAB))  # never wrapped: does not rely on the gate being closed
    processors = plain_logits_processors(reference, PROMPT, **GENERATION)
    return mtp, exact_joint_distribution(reference, PROMPT, processors, SAMPLED_TOKENS)


def sampled_pvalue(setup, monkeypatch, verification):
    mtp, exact = setup
    spy = AcceptedDepthSpy(monkeypatch, verification)
    torch.manual_seed(1234)
    tokens = sample_generations(mtp.base, PROMPT, lambda: MTPDrafter(mtp), SAMPLES, verification=verification,
                                **GENERATION)
    return chi_square_pvalue(joint_counts(tokens, VOCAB, SAMPLED_TOKENS), exact), spy


def test_sampled_tokens_follow_the_target_distribution(sampling_setup, monkeypatch):
    pvalue, spy = sampled_pvalue(sampling_setup, monkeypatch, "rrs")
    print(f"\nmtp rrs: p = {pvalue:.3g}, steps by accepted draft tokens {sorted(spy.counts.items())}")
    assert spy.counts.get(0, 0) >= SAMPLES + SAMPLES // 10  # each call's first step drafts nothing (no latents yet)
    assert spy.steps_reaching(2) >= SAMPLES // 10
    assert pvalue > 1e-3


def test_negative_control_accepting_every_draft_is_detected(sampling_setup, monkeypatch):
    accept_every_draft_token(monkeypatch)
    pvalue, _ = sampled_pvalue(sampling_setup, monkeypatch, "rrs")
    print(f"\nmtp negative control: p = {pvalue:.3g}")
    assert pvalue < 1e-6


# ---------------------------------------------------------------------------------------------- publishing
def test_save_load_by_path_decodes_like_the_original(tmp_path):
    base = tiny_model("gemma3")
    original = MTPDrafter(random_adapter(base, seed=8))
    prompt = tiny_prompt(seed=8)
    expected = speculative(base, prompt, original)
    original.mtp.save_pretrained(tmp_path / "adapter")
    fresh = tiny_model("gemma3")
    loaded = MTPDrafter.from_pretrained(tmp_path / "adapter", fresh)
    assert torch.equal(speculative(fresh, prompt, loaded), expected)
    assert loaded.stats.accepted_tokens == original.stats.accepted_tokens
    with pytest.raises(UnsupportedError, match="built for another model"):
        MTPDrafter.from_pretrained(tmp_path / "adapter", tiny_model("gemma3", num_hidden_layers=3))


def test_push_and_load_by_id_through_a_local_hub(tmp_path):
    with LocalHub() as hub:
        result = run_python("""
import json, torch, hf_spec
from tests.conftest import tiny_model, tiny_prompt
from tests.test_mtp_decoding import random_adapter
base = tiny_model("llama")
mtp = random_adapter(base, seed=9)
mtp.push_to_hub("tester/mtp-tiny", model_card="---\\nlibrary_name: hf_spec\\n---\\n# card\\n")
model = tiny_model("llama")
drafter = hf_spec.MTPDrafter.from_pretrained("tester/mtp-tiny", target=model)
prompt = tiny_prompt(9)
got = model.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=drafter)
same = torch.equal(got, tiny_model("llama").generate(prompt, max_new_tokens=16, do_sample=False))
loaded = all(torch.equal(a, b) for a, b in zip(mtp.adapter_state_dict().values(),
                                               drafter.mtp.adapter_state_dict().values()))
print(json.dumps({"same": same, "loaded": loaded, "drafted": drafter.stats.drafted_tokens}))
""", hub_env(hub, tmp_path))
        files = hub.repos["tester/mtp-tiny"]
    assert result["same"] and result["loaded"] and result["drafted"] > 0
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(files["config.json"])["num_mask_tokens"] == K


def test_the_bench_gives_an_mtp_spec_its_own_copy_of_a_packed_target(tmp_path):
    """``hf-spec bench`` builds ``MTPDrafter.from_pretrained(...)`` on a copy of the target that shares its (packed)
    weights: the other methods keep the target as loaded, and the MTP method decodes with the copy, losslessly."""
    from hf_spec.bench.methods import build_methods
    from hf_spec.drafters.mtp import GatedLoRALinear

    random_adapter(tiny_model("llama", dtype=torch.float32), seed=10).save_pretrained(tmp_path / "adapter")
    target = hf_spec.accelerate_for_cpu(tiny_model("llama", dtype=torch.float32))
    spec = f"MTPDrafter.from_pretrained(path_or_id='{tmp_path / 'adapter'}')"
    generation = dict(max_new_tokens=16, do_sample=False)
    methods, skipped = build_methods(target, None, generation, ["plain", spec])
    assert not skipped and [method.name for method in methods] == ["plain", spec]
    plain_method, mtp_method = methods
    assert not any(isinstance(module, GatedLoRALinear) for module in target.modules())
    assert mtp_method.model is not target and mtp_method.model is mtp_method.drafter.model
    copied = {id(buffer) for buffer in mtp_method.model.buffers()}
    assert {id(buffer) for buffer in target.buffers()} <= copied  # the packed weights are shared, not copied
    prompt = tiny_prompt(seed=10)
    assert_greedy_identical(target, plain_method.generate(prompt), mtp_method.generate(prompt))
    assert mtp_method.drafter.stats.drafted_tokens > 0
