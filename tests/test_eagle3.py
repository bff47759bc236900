"""EAGLE-3: config and checkpoints, training-time test against inference, greedy token identity with plain
generate() (random and fitted drafts, chains and dynamic trees, three architectures, a trimmed draft vocabulary),
and the sampled output distribution with a negative control."""

from __future__ import annotations

import json

import pytest
import torch

import hf_spec
from hf_spec.drafters.draft_vocab import DraftVocabulary
from hf_spec.drafters.eagle3 import Eagle3Config, Eagle3Draft, Eagle3Drafter
from hf_spec.drafters.eagle3.config import default_feature_layers
from hf_spec.engine.features import FINAL
from hf_spec.errors import UnsupportedError
from hf_spec.training.feature_cache import compute_features, feature_key
from hf_spec.training.config import load_config
from hf_spec.training.hub import CheckpointError
from hf_spec.training.methods import get_method
from hf_spec.training.methods.eagle3_objective import Eagle3Objective
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


def random_draft(target, seed: int = 0, **kwargs) -> Eagle3Draft:
    torch.manual_seed(seed)
    return Eagle3Draft.for_target(target, **kwargs).eval()


def fitted_draft(target, sequences: torch.Tensor, steps: int = 120, lr: float = 0.01, ttt_steps: int = 3,
                 **kwargs) -> Eagle3Draft:
    """EAGLE-3 in miniature: the draft trained with training-time test on the frozen target's own sequences."""
    draft = random_draft(target, **kwargs).train()
    objective = Eagle3Objective(target, draft, steps=ttt_steps)
    mask = torch.ones_like(sequences)
    optimizer = torch.optim.Adam(draft.parameters(), lr=lr)
    target.requires_grad_(False)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(sequences, mask, mask)["loss"].backward()
        optimizer.step()
    return draft.eval().requires_grad_(False)


def plain(model, prompt, max_new_tokens=MAX_NEW):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                          do_sample=False)


def speculative(model, prompt, drafter, max_new_tokens=MAX_NEW, **kwargs):
    kwargs.setdefault("draft_length", "fixed")  # these tests are about the drafter's own trees
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=drafter,
                          max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


# ---------------------------------------------------------------------------------------------- config
def test_config_round_trips_and_rejects_bad_values():
    config = Eagle3Config(hidden_size=32, vocab_size=96, num_target_layers=4, feature_layers=[1, 2, 3],
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                          step_top1=[0.5, 0.3])
    assert Eagle3Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.feature_size == 96
    with pytest.raises(ValueError, match="feature_layers"):
        Eagle3Config(**{**config.to_dict(), "feature_layers": [5]})
    with pytest.raises(ValueError, match="twice"):
        Eagle3Config(**{**config.to_dict(), "feature_layers": [1, 1, 3]})
    with pytest.raises(ValueError, match="key/value heads"):
        Eagle3Config(**{**config.to_dict(), "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="draft_vocab_size"):
        Eagle3Config(**{**config.to_dict(), "draft_vocab_size": 97})
    with pytest.raises(CheckpointError, match="Unknown EAGLE-3 config keys"):
        Eagle3Config.from_dict({**config.to_dict(), "surprise": 1})
    with pytest.raises(CheckpointError, match="not EAGLE-3"):
        Eagle3Config.from_dict({**config.to_dict(), "method": "medusa"})
    with pytest.raises(CheckpointError, match="newer"):
        Eagle3Config.from_dict({**config.to_dict(), "format_version": 99})


def test_default_feature_layers_are_low_middle_high():
    assert default_feature_layers(30) == [2, 15, 27]  # SmolLM2-135M
    assert default_feature_layers(28) == [2, 14, 25]  # Qwen2.5-Coder-1.5B
    assert default_feature_layers(2) == [0, 1, 2]  # the tiny test models: distinct, clamped


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_draft_layer_is_shaped_like_the_target(arch):
    target = tiny_model(arch)
    draft = random_draft(target)
    text = target.config.get_text_config()
    assert draft.config.feature_layers == default_feature_layers(text.num_hidden_layers)
    assert draft.fc.in_features == 3 * text.hidden_size
    assert draft.layer.self_attn.q_proj.in_features == 2 * text.hidden_size
    assert draft.layer.self_attn.k_proj.out_features == text.num_key_value_heads * draft.config.head_dim
    torch.testing.assert_close(draft.lm_head.weight, target.get_output_embeddings().weight)
    assert draft.lm_head.weight.data_ptr() != target.get_output_embeddings().weight.data_ptr()  # a copy, trainable


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip_and_target_checks(tmp_path):
    target = tiny_model("llama")
    vocabulary = DraftVocabulary(torch.arange(0, 96, 2), 96)
    draft = random_draft(target, draft_vocab=vocabulary, tree_depth=3)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    draft.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "draft_vocab.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    drafter = Eagle3Drafter.from_pretrained(tmp_path, target=target)
    loaded = drafter.draft
    assert loaded.config == draft.config and loaded.draft_vocab.size == 48
    assert drafter.default_tree_spec.depth == 3
    for name, tensor in draft.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert not any(name.startswith("embed") for name in draft.state_dict())  # the target's embeddings: not stored

    wider = tiny_model("llama", hidden_size=48, num_attention_heads=4)
    with pytest.raises(UnsupportedError, match="hidden size 32"):
        Eagle3Drafter.from_pretrained(tmp_path, target=wider)
    deeper = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(UnsupportedError, match="target layers"):
        Eagle3Drafter.from_pretrained(tmp_path, target=deeper)
    (tmp_path / "draft_vocab.safetensors").unlink()
    with pytest.raises(CheckpointError, match="draft vocabulary"):
        Eagle3Draft.from_pretrained(tmp_path, target=target)


def test_drafter_refuses_unknown_tree_shapes_and_other_modules():
    target = tiny_model("llama")
    with pytest.raises(TypeError, match="Eagle3Draft"):
        Eagle3Drafter(target)
    with pytest.raises(ValueError, match="grows trees of shape"):
        Eagle3Drafter(random_draft(target), tree="beam")
    with pytest.raises(ValueError, match="tree must be one of"):
        speculative(target, tiny_prompt(), Eagle3Drafter(random_draft(target)), tree="beam")
    static = Eagle3Drafter(random_draft(target), tree="static", top_k=3, depth=4).default_tree_spec
    assert (static.shape, static.depth, static.top_k, static.budget) == ("static", 4, 3, 12)


# ---------------------------------------------------------------------------------------------- training-time test
def test_unrolled_training_steps_equal_what_the_drafter_computes():
    """Step j of the training-time test at anchor t gives the logits that drafting at t computes for depth j + 1
    when the drafted tokens are the data's: the prefix rows from the target's features, each later row from the
    previous output, attending to the prefix and to its own chain."""
    target = tiny_model("qwen2")
    draft = random_draft(target)
    objective = Eagle3Objective(target, draft, steps=3)
    sequence = tiny_prompt(seed=3, length=14)
    mask = torch.ones_like(sequence)
    predictions = objective.unrolled(sequence, mask, mask)

    layers = tuple(draft.config.feature_layers)
    features = compute_features(target, sequence, mask, layers + (FINAL,))
    fused = torch.cat([features[feature_key(layer)] for layer in layers], dim=-1)
    embed = target.get_input_embeddings()
    anchor = 7
    with torch.no_grad():
        keys, values = draft.empty_cache("cpu")
        rows = anchor + 1
        allowed = torch.ones(rows, rows, dtype=torch.bool).tril()
        output, keys, values = draft.step(embed(sequence[:, 1 : rows + 1]), draft.fuse(fused[:, :rows]),
                                          torch.arange(rows)[None], keys, values, allowed)
        hidden = output[:, -1:]
        expected = [draft.logits(hidden[0, 0])]
        for depth in range(1, 3):
            past = keys.shape[2]
            allowed = torch.ones(1, past + 1, dtype=torch.bool)
            hidden, new_keys, new_values = draft.step(embed(sequence[:, anchor + 1 + depth][None]), hidden,
                                                      torch.tensor([[anchor + depth]]), keys, values, allowed)
            keys, values = torch.cat([keys, new_keys], dim=2), torch.cat([values, new_values], dim=2)
            expected.append(draft.logits(hidden[0, 0]))
    for step, prediction in enumerate(predictions):
        row = int(((prediction.rows == 0) & (prediction.anchors == anchor)).nonzero())
        torch.testing.assert_close(prediction.logits[row], expected[step])


def test_sequences_shorter_than_the_unrolled_steps_train():
    target = tiny_model("llama")
    objective = Eagle3Objective(target, random_draft(target), steps=7)
    sequence = tiny_prompt(seed=3, length=4)
    mask = torch.ones_like(sequence)
    out = objective(sequence, mask, mask)
    assert torch.isfinite(out["loss"]) and out["step_top1"].shape == (7,)


def test_training_reduces_the_loss_and_raises_agreement():
    target = tiny_model("llama")
    sequences = torch.cat([plain(target, tiny_prompt(seed=seed, length=6), max_new_tokens=20) for seed in range(4)])
    mask = torch.ones_like(sequences)
    untrained = Eagle3Objective(target, random_draft(target))(sequences, mask, mask)
    trained = Eagle3Objective(target, fitted_draft(target, sequences, steps=100))(sequences, mask, mask)
    # the random target is near uniform, so its cross-entropy is close to its entropy already
    assert float(trained["loss"]) < float(untrained["loss"].detach()) - 0.01
    for step in range(3):  # every unrolled step learned the target's argmax
        assert float(trained["step_top1"][step]) > float(untrained["step_top1"][step]) + 0.3


# ---------------------------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_random_draft_is_greedy_identical(arch, tree):
    """A random draft layer: almost nothing is accepted, every step corrects."""
    target = tiny_model(arch)
    prompt = tiny_prompt(seed=1)
    drafter = Eagle3Drafter(random_draft(target), tree=tree, depth=4, top_k=3, budget=10)
    got = speculative(target, prompt, drafter)
    assert_greedy_identical(target, plain(target, prompt), got)
    assert drafter.stats.mean_accepted_tokens < 1.5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_fitted_draft_is_accepted_and_greedy_identical(arch, tree):
    """A draft fitted to the target's continuation of the prompt: most drafts are accepted, whole chains often (a
    dynamic tree of the draft's flat distributions may rank a sibling above a chain node, so its bar is lower)."""
    target = tiny_model(arch)
    prompt = tiny_prompt(seed=2, length=8)
    expected = plain(target, prompt, max_new_tokens=40)
    drafter = Eagle3Drafter(fitted_draft(target, expected, steps=150), tree=tree, depth=4, top_k=3, budget=10)
    got = speculative(target, prompt, drafter, max_new_tokens=40)
    assert_greedy_identical(target, expected, got)
    assert drafter.stats.mean_accepted_tokens > (3.0 if tree == "chain" else 2.5)


def test_trimmed_draft_vocabulary_and_one_token_prompt_are_greedy_identical():
    target = tiny_model("llama")
    prompt = tiny_prompt(seed=2, length=8)
    expected = plain(target, prompt, max_new_tokens=40)
    vocabulary = DraftVocabulary(torch.unique(torch.cat([expected[0], torch.arange(1, 40)])), 96)
    drafter = Eagle3Drafter(fitted_draft(target, expected, steps=150, draft_vocab=vocabulary), depth=4, top_k=3)
    assert_greedy_identical(target, expected, speculative(target, prompt, drafter, max_new_tokens=40))
    assert drafter.stats.mean_accepted_tokens > 3.0
    one = prompt[:, :1]
    assert_greedy_identical(target, plain(target, one), speculative(target, one, Eagle3Drafter(random_draft(target))))


def test_drafts_are_fed_from_the_target_after_rejections():
    """The draft's cache holds exactly the committed prefix: after a step its cache length is the prefix's."""
    target = tiny_model("llama")
    prompt = tiny_prompt(seed=4)
    expected = plain(target, prompt, max_new_tokens=30)
    drafter = Eagle3Drafter(fitted_draft(target, expected[:, : prompt.shape[1] + 15], steps=100), depth=4, top_k=2)
    got = speculative(target, prompt, drafter, max_new_tokens=30)
    assert_greedy_identical(target, expected, got)
    assert drafter._keys.shape[2] <= got.shape[1] - 1


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
    draft = fitted_draft(target, samples, steps=80, lr=0.02)
    processors = plain_logits_processors(target, PROMPT, **GENERATION)
    return target, draft, exact_joint_distribution(target, PROMPT, processors, SAMPLED_TOKENS)


def sampled_pvalue(setup, monkeypatch, verification):
    target, draft, exact = setup
    spy = AcceptedDepthSpy(monkeypatch, verification)
    torch.manual_seed(1234)
    tokens = sample_generations(target, PROMPT, lambda: Eagle3Drafter(draft, depth=3, top_k=2, budget=6), SAMPLES,
                                verification=verification, **GENERATION)
    return chi_square_pvalue(joint_counts(tokens, VOCAB, SAMPLED_TOKENS), exact), spy


@pytest.mark.parametrize("verification", ["rrs", "rrs_without_replacement"])
def test_sampled_tokens_follow_the_target_distribution(sampling_setup, monkeypatch, verification):
    pvalue, spy = sampled_pvalue(sampling_setup, monkeypatch, verification)
    print(f"\neagle3 {verification}: p = {pvalue:.3g}, steps by accepted draft tokens {sorted(spy.counts.items())}")
    assert spy.counts.get(0, 0) >= SAMPLES // 10
    assert spy.steps_reaching(2) >= SAMPLES // 10
    assert pvalue > 1e-3


def test_negative_control_accepting_every_draft_is_detected(sampling_setup, monkeypatch):
    accept_every_draft_token(monkeypatch)
    pvalue, _ = sampled_pvalue(sampling_setup, monkeypatch, "rrs")
    print(f"\neagle3 negative control: p = {pvalue:.3g}")
    assert pvalue < 1e-6


@pytest.mark.parametrize("recipe, num_layers", [("smollm2-135m", 30), ("qwen2.5-coder-1.5b", 28)])
def test_recipes_name_the_default_layers_and_cache_them(recipe, num_layers):
    """The SmolLM2 and Qwen2.5-Coder-1.5B recipes, checked on a tiny model with the real layer count."""
    config = load_config(f"configs/eagle3/{recipe}.yaml")
    assert get_method("eagle3").validate(config) == []
    layers = config.eagle3.feature_layers
    assert layers == default_feature_layers(num_layers)
    assert get_method("eagle3").batch_features(config) == [*layers, FINAL]  # the target never runs in training
    target = tiny_model("qwen2", num_hidden_layers=num_layers)
    draft = random_draft(target, feature_layers=layers)
    prompt = tiny_prompt(seed=5)
    drafter = Eagle3Drafter(draft, depth=config.eagle3.tree_depth, top_k=config.eagle3.tree_top_k,
                            budget=config.eagle3.tree_budget)
    assert_greedy_identical(target, plain(target, prompt, 8), speculative(target, prompt, drafter, 8))


def test_exported_in_the_package():
    assert hf_spec.Eagle3Drafter is Eagle3Drafter and hf_spec.Eagle3Draft is Eagle3Draft
