"""Clover-2: config and checkpoints, the training objective against inference, greedy token identity with plain
generate() (random and fitted heads, chains and dynamic trees, three architectures, a trimmed draft vocabulary),
and the sampled output distribution with a negative control."""

from __future__ import annotations

import json

import pytest
import torch

import hf_spec
from hf_spec.drafters.clover import CloverConfig, CloverDrafter, CloverHeads
from hf_spec.drafters.draft_vocab import DraftVocabulary
from hf_spec.engine.features import FINAL
from hf_spec.errors import UnsupportedError
from hf_spec.training.config import load_config
from hf_spec.training.feature_cache import compute_features, feature_key
from hf_spec.training.hub import CheckpointError
from hf_spec.training.methods import get_method
from hf_spec.training.methods.clover_objective import CloverObjective
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

MAX_NEW = 24

pytestmark = pytest.mark.usefixtures("single_thread")


def random_heads(target, num_heads: int = 4, seed: int = 0, **kwargs) -> CloverHeads:
    torch.manual_seed(seed)
    heads = CloverHeads.for_target(target, num_heads=num_heads, **kwargs)
    with torch.no_grad():  # away from the target's own layer, so that drafts are mostly wrong
        for parameter in heads.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return heads.eval()


def fitted_heads(target, sequences: torch.Tensor, steps: int = 120, lr: float = 0.01, num_heads: int = 4,
                 **kwargs) -> CloverHeads:
    """Clover-2 in miniature: the heads trained with the recipe's objective on the frozen target's own sequences."""
    torch.manual_seed(0)
    heads = CloverHeads.for_target(target, num_heads=num_heads, **kwargs).train()
    objective = CloverObjective(target, heads)
    mask = torch.ones_like(sequences)
    optimizer = torch.optim.Adam(heads.parameters(), lr=lr)
    target.requires_grad_(False)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(sequences, mask, mask)["loss"].backward()
        optimizer.step()
    return heads.eval().requires_grad_(False)


def plain(model, prompt, max_new_tokens=MAX_NEW):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                          do_sample=False)


def speculative(model, prompt, drafter, max_new_tokens=MAX_NEW, **kwargs):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=drafter,
                          max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


# ---------------------------------------------------------------------------------------------- config
def test_config_round_trips_and_rejects_bad_values():
    config = CloverConfig(hidden_size=32, vocab_size=96, num_target_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=64, head_top1=[0.5, 0.3])
    assert CloverConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.feature_layer == 2
    with pytest.raises(ValueError, match="num_heads"):
        CloverConfig(**{**config.to_dict(), "num_heads": 0})
    with pytest.raises(ValueError, match="key/value heads"):
        CloverConfig(**{**config.to_dict(), "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="draft_vocab_size"):
        CloverConfig(**{**config.to_dict(), "draft_vocab_size": 97})
    with pytest.raises(CheckpointError, match="Unknown Clover-2 config keys"):
        CloverConfig.from_dict({**config.to_dict(), "surprise": 1})
    with pytest.raises(CheckpointError, match="not Clover-2"):
        CloverConfig.from_dict({**config.to_dict(), "method": "eagle3"})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_untrained_heads_start_from_the_targets_last_layer_norm_and_head(arch):
    target = tiny_model(arch)
    heads = CloverHeads.for_target(target, num_heads=3)
    last = target.model.layers[-1]
    torch.testing.assert_close(heads.decoder.self_attn.q_proj.weight, last.self_attn.q_proj.weight)
    torch.testing.assert_close(heads.decoder.mlp.down_proj.weight, last.mlp.down_proj.weight)
    if arch == "qwen2":
        torch.testing.assert_close(heads.decoder.self_attn.k_proj.bias, last.self_attn.k_proj.bias)
    hidden = torch.randn(5, 32, dtype=torch.float64)
    expected = target.lm_head(target.model.norm(hidden))  # augmenting blocks start as the identity
    if arch == "gemma3" and target.config.final_logit_softcapping:
        cap = target.config.final_logit_softcapping
        expected = cap * torch.tanh(expected / cap)
    torch.testing.assert_close(heads.logits(2, hidden), expected)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip_and_target_checks(tmp_path):
    target = tiny_model("qwen2")
    heads = random_heads(target, num_heads=3, draft_vocab=DraftVocabulary(torch.arange(0, 96, 2), 96))
    heads.save_pretrained(tmp_path)
    drafter = CloverDrafter.from_pretrained(tmp_path, target=target)
    assert drafter.heads.config == heads.config and drafter.heads.draft_vocab.size == 48
    assert drafter.default_tree_spec.depth == 3 and drafter.target_features == (2,)
    for name, tensor in heads.state_dict().items():
        torch.testing.assert_close(drafter.heads.state_dict()[name], tensor)
    with pytest.raises(UnsupportedError, match="hidden size 32"):
        CloverDrafter.from_pretrained(tmp_path, target=tiny_model("qwen2", hidden_size=48))
    with pytest.raises(UnsupportedError, match="target layers"):
        CloverDrafter.from_pretrained(tmp_path, target=tiny_model("qwen2", num_hidden_layers=3))
    with pytest.raises(ValueError, match="at most 3"):
        CloverDrafter(heads, depth=4)
    with pytest.raises(ValueError, match="grows trees of shape"):
        CloverDrafter(heads, tree="beam")
    with pytest.raises(TypeError, match="CloverHeads"):
        CloverDrafter(target)


# ---------------------------------------------------------------------------------------------- objective
def test_training_heads_equal_what_the_drafter_computes():
    """Head i of the objective at anchor t gives the logits the drafter computes for depth i + 1 when the drafted
    tokens are the data's: the state chained from the target's feature at t, the path's tokens, the prefix."""
    target = tiny_model("llama")
    heads = random_heads(target, num_heads=3)
    sequence = tiny_prompt(seed=3, length=14)
    mask = torch.ones_like(sequence)
    predictions = CloverObjective(target, heads).unrolled(sequence, mask, mask)

    layer = heads.config.feature_layer
    hidden = compute_features(target, sequence, mask, (layer, FINAL))[feature_key(layer)]
    anchor = 7
    with torch.no_grad():
        prefix_keys, prefix_values = heads.decoder.prefix_keys(hidden[:, : anchor + 1], torch.arange(anchor + 1)[None])
        state = hidden[:, anchor : anchor + 1]
        expected = []
        for head in range(3):
            positions = torch.arange(anchor + 1, anchor + 2 + head)[None]
            keys, values = heads.regressive.token_keys(target.get_input_embeddings()(sequence[:, positions[0]]),
                                                       positions)
            everything = torch.ones(1, 1, 1, positions.shape[1], dtype=torch.bool)
            state = heads.step(state, positions[:, -1:], keys, values, everything, prefix_keys, prefix_values,
                               torch.ones(1, 1, 1, anchor + 1, dtype=torch.bool))
            expected.append(heads.logits(head, state[0, 0]))
    for head, prediction in enumerate(predictions):
        row = int(((prediction.rows == 0) & (prediction.anchors == anchor)).nonzero())
        torch.testing.assert_close(prediction.logits[row], expected[head])


def test_training_raises_agreement_and_regresses_features():
    target = tiny_model("llama")
    sequences = torch.cat([plain(target, tiny_prompt(seed=seed, length=6), max_new_tokens=20) for seed in range(4)])
    mask = torch.ones_like(sequences)
    torch.manual_seed(0)
    untrained = CloverObjective(target, CloverHeads.for_target(target, num_heads=3))(sequences, mask, mask)
    trained = CloverObjective(target, fitted_heads(target, sequences, steps=100, num_heads=3))(sequences, mask, mask)
    assert float(trained["loss"]) < float(untrained["loss"].detach())
    assert bool((trained["feature_losses"] < 0.1 * untrained["feature_losses"]).all())
    for head in range(3):
        assert float(trained["step_top1"][head]) > float(untrained["step_top1"][head]) + 0.3


# ---------------------------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_random_heads_are_greedy_identical(arch, tree):
    """Perturbed untrained heads: almost nothing is accepted, every step corrects."""
    target = tiny_model(arch)
    prompt = tiny_prompt(seed=1)
    drafter = CloverDrafter(random_heads(target), tree=tree, top_k=3, budget=10)
    assert_greedy_identical(target, plain(target, prompt), speculative(target, prompt, drafter))
    assert drafter.stats.mean_accepted_tokens < 1.5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_fitted_heads_are_accepted_and_greedy_identical(arch, tree):
    target = tiny_model(arch)
    prompt = tiny_prompt(seed=2, length=8)
    expected = plain(target, prompt, max_new_tokens=40)
    drafter = CloverDrafter(fitted_heads(target, expected, steps=150), tree=tree, top_k=3, budget=10)
    assert_greedy_identical(target, expected, speculative(target, prompt, drafter, max_new_tokens=40))
    assert drafter.stats.mean_accepted_tokens > 2.5


def test_trimmed_draft_vocabulary_generate_kwargs_and_one_token_prompt_are_greedy_identical():
    target = tiny_model("llama")
    prompt = tiny_prompt(seed=2, length=8)
    expected = plain(target, prompt, max_new_tokens=40)
    vocabulary = DraftVocabulary(torch.unique(torch.cat([expected[0], torch.arange(1, 40)])), 96)
    heads = fitted_heads(target, expected, steps=150, draft_vocab=vocabulary)
    drafter = CloverDrafter(heads, top_k=3)
    assert_greedy_identical(target, expected, speculative(target, prompt, drafter, max_new_tokens=40))
    assert drafter.stats.mean_accepted_tokens > 2.5
    chain = CloverDrafter(heads)
    got = speculative(target, prompt, chain, max_new_tokens=40, tree="chain", tree_depth=2)
    assert_greedy_identical(target, expected, got)
    assert chain.stats.drafted_tokens <= 2 * chain.stats.target_forwards  # the call's depth, not the heads'
    one = prompt[:, :1]
    assert_greedy_identical(target, plain(target, one), speculative(target, one, CloverDrafter(random_heads(target))))


# ---------------------------------------------------------------------------------------------- sampling
VOCAB = 8
SAMPLES = 400
SAMPLED_TOKENS = 3
GENERATION = dict(do_sample=True, temperature=0.7, top_k=6, repetition_penalty=1.2, max_new_tokens=4)
PROMPT = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])


@pytest.fixture(scope="module")
def sampling_setup():
    target = peaked_tiny_llama(VOCAB)
    torch.manual_seed(0)
    with torch.no_grad():
        samples = target.generate(PROMPT.expand(64, -1), attention_mask=torch.ones(64, PROMPT.shape[1]),
                                  **{**GENERATION, "max_new_tokens": 10})
    heads = fitted_heads(target, samples, steps=60, lr=0.02, num_heads=3)
    processors = plain_logits_processors(target, PROMPT, **GENERATION)
    return target, heads, exact_joint_distribution(target, PROMPT, processors, SAMPLED_TOKENS)


def sampled_pvalue(setup, monkeypatch, verification):
    target, heads, exact = setup
    spy = AcceptedDepthSpy(monkeypatch, verification)
    torch.manual_seed(1234)
    tokens = sample_generations(target, PROMPT, lambda: CloverDrafter(heads, top_k=2, budget=6), SAMPLES,
                                verification=verification, **GENERATION)
    return chi_square_pvalue(joint_counts(tokens, VOCAB, SAMPLED_TOKENS), exact), spy


@pytest.mark.parametrize("verification", ["rrs", "rrs_without_replacement"])
def test_sampled_tokens_follow_the_target_distribution(sampling_setup, monkeypatch, verification):
    pvalue, spy = sampled_pvalue(sampling_setup, monkeypatch, verification)
    print(f"\nclover {verification}: p = {pvalue:.3g}, steps by accepted draft tokens {sorted(spy.counts.items())}")
    assert spy.counts.get(0, 0) >= SAMPLES // 10
    assert spy.steps_reaching(2) >= SAMPLES // 10
    assert pvalue > 1e-3


def test_negative_control_accepting_every_draft_is_detected(sampling_setup, monkeypatch):
    accept_every_draft_token(monkeypatch)
    pvalue, _ = sampled_pvalue(sampling_setup, monkeypatch, "rrs")
    print(f"\nclover negative control: p = {pvalue:.3g}")
    assert pvalue < 1e-6


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe, num_layers", [("smollm2-135m", 30), ("qwen2.5-coder-1.5b", 28)])
def test_recipes_read_the_last_layer_from_the_cache(recipe, num_layers):
    """The SmolLM2 and Qwen2.5-Coder-1.5B recipes, checked on a tiny Qwen2 with the real layer count."""
    config = load_config(f"configs/clover/{recipe}.yaml")
    method = get_method("clover")
    assert method.validate(config) == []
    assert config.clover.feature_layer == num_layers
    assert method.batch_features(config) == [num_layers, FINAL]  # the target never runs in training
    target = tiny_model("qwen2", num_hidden_layers=num_layers)
    heads = random_heads(target, num_heads=config.clover.num_heads)
    drafter = CloverDrafter(heads, top_k=config.clover.tree_top_k, budget=config.clover.tree_budget)
    prompt = tiny_prompt(seed=5)
    assert_greedy_identical(target, plain(target, prompt, 8), speculative(target, prompt, drafter, 8))


def test_exported_in_the_package():
    assert hf_spec.CloverDrafter is CloverDrafter and hf_spec.CloverHeads is CloverHeads
