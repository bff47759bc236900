"""Falcon: config and checkpoints, the training passes against inference, glancing, greedy token identity with
plain generate() (random and fitted drafters, chains and dynamic trees, three architectures, a trimmed draft
vocabulary), and the sampled output distribution with a negative control."""

from __future__ import annotations

import json

import pytest
import torch

import hf_spec
from hf_spec.drafters.draft_vocab import DraftVocabulary
from hf_spec.drafters.falcon import FalconConfig, FalconDraft, FalconDrafter
from hf_spec.drafters.falcon.layer import Recurrence, relaxed_causal_mask
from hf_spec.engine.features import FINAL
from hf_spec.errors import UnsupportedError
from hf_spec.training.config import load_config
from hf_spec.training.feature_cache import compute_features, feature_key
from hf_spec.training.hub import CheckpointError
from hf_spec.training.methods import get_method
from hf_spec.training.methods.falcon import glance_schedule
from hf_spec.training.methods.falcon_objective import FalconObjective
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


def random_draft(target, seed: int = 0, **kwargs) -> FalconDraft:
    torch.manual_seed(seed)
    draft = FalconDraft.for_target(target, **kwargs)
    with torch.no_grad():
        for parameter in draft.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return draft.eval()


def fitted_draft(target, sequences: torch.Tensor, steps: int = 150, lr: float = 0.01, **kwargs) -> FalconDraft:
    """Falcon in miniature: trained with the recipe's objective (token loss weighted up: tiny features are small)."""
    torch.manual_seed(0)
    draft = FalconDraft.for_target(target, **kwargs).train()
    objective = FalconObjective(target, draft, passes=2, token_loss_weight=1.0, glance_ratio=0.3)
    mask = torch.ones_like(sequences)
    optimizer = torch.optim.Adam(draft.trainable_parameters(), lr=lr)
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
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=drafter,
                          max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


# ---------------------------------------------------------------------------------------------- config and shapes
def test_config_round_trips_and_rejects_bad_values():
    config = FalconConfig(hidden_size=32, vocab_size=96, num_target_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=64, step_top1=[0.5, 0.3])
    assert FalconConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.tree_depth == 6
    with pytest.raises(ValueError, match="block_size"):
        FalconConfig(**{**config.to_dict(), "block_size": 0})
    with pytest.raises(ValueError, match="key/value heads"):
        FalconConfig(**{**config.to_dict(), "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="draft_vocab_size"):
        FalconConfig(**{**config.to_dict(), "draft_vocab_size": 97})
    with pytest.raises(CheckpointError, match="Unknown Falcon config keys"):
        FalconConfig.from_dict({**config.to_dict(), "surprise": 1})
    with pytest.raises(CheckpointError, match="not Falcon"):
        FalconConfig.from_dict({**config.to_dict(), "method": "clover"})


def test_relaxed_causal_mask_is_full_inside_blocks_and_causal_between_them():
    assert relaxed_causal_mask(5, 2).int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0],
                                                        [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(relaxed_causal_mask(4, 1), torch.ones(4, 4, dtype=torch.bool).tril())


def test_recurrence_cells_equal_the_cell_state_of_stepping_the_lstm():
    torch.manual_seed(0)
    recurrence = Recurrence(6, 5)
    inputs = torch.randn(2, 7, 6)
    hidden, _ = recurrence(inputs)
    expected, state = [], None
    for row in range(inputs.shape[1]):
        _, state = recurrence(inputs[:, row : row + 1], state)
        expected.append(state[1])
    torch.testing.assert_close(recurrence.cells(inputs, hidden), torch.stack(expected, dim=1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_untrained_drafter_scores_with_the_targets_head_which_stays_frozen(arch):
    target = tiny_model(arch)
    draft = FalconDraft.for_target(target)
    hidden = torch.randn(5, 32, dtype=torch.float64)
    expected = target.lm_head(hidden)
    if arch == "gemma3" and target.config.final_logit_softcapping:
        cap = target.config.final_logit_softcapping
        expected = cap * torch.tanh(expected / cap)
    torch.testing.assert_close(draft.logits(hidden), expected)
    trainable = {id(parameter) for parameter in draft.trainable_parameters()}
    assert id(draft.lm_head.weight) not in trainable and len(trainable) == len(list(draft.parameters())) - 1


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip_and_target_checks(tmp_path):
    target = tiny_model("qwen2")
    draft = random_draft(target, num_passes=2, draft_vocab=DraftVocabulary(torch.arange(0, 96, 2), 96))
    draft.save_pretrained(tmp_path)
    drafter = FalconDrafter.from_pretrained(tmp_path, target=target)
    assert drafter.draft.config == draft.config and drafter.draft.draft_vocab.size == 48
    assert drafter.default_tree_spec.depth == 4 and drafter.target_features == (FINAL,)
    for name, tensor in draft.state_dict().items():
        torch.testing.assert_close(drafter.draft.state_dict()[name], tensor)
    with pytest.raises(UnsupportedError, match="hidden size 32"):
        FalconDrafter.from_pretrained(tmp_path, target=tiny_model("qwen2", hidden_size=48))
    with pytest.raises(UnsupportedError, match="target layers"):
        FalconDrafter.from_pretrained(tmp_path, target=tiny_model("qwen2", num_hidden_layers=3))
    with pytest.raises(ValueError, match="grows trees of shape"):
        FalconDrafter(draft, tree="beam")
    with pytest.raises(TypeError, match="FalconDraft"):
        FalconDrafter(target)


# ---------------------------------------------------------------------------------------------- objective
def drafter_logits_along_the_data(target, draft, sequence, anchor: int) -> list[torch.Tensor]:
    """What FalconDrafter computes at anchor ``t`` (rows ``0..t`` committed, root ``x_{t+1}``) for depths 1..2k
    when the drafted tokens are the data's: the committed block, then one pass from the depth-k node."""
    k = draft.config.block_size
    features = compute_features(target, sequence, torch.ones_like(sequence), (FINAL,))[feature_key(FINAL)]
    drafter = FalconDrafter(draft)
    drafter._embed = target.get_input_embeddings()
    drafter._keys, drafter._values = draft.empty_cache("cpu")
    with torch.no_grad():
        drafter._commit(sequence[:, : anchor + 2], features[:, : anchor + 1])
        passes = {-1: drafter._root_pass}
        tokens = sequence[0, anchor + 2 : anchor + 2 + k].tolist()
        parents = list(range(-1, k - 1))
        drafter._run_passes([k - 1], [tokens], tokens, parents, passes, anchor + 1, anchor + 1)
    return list(passes[-1].logits) + list(passes[k - 1].logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_training_passes_equal_what_the_drafter_computes(arch):
    """Depth j at an anchor ending a block: the objective's logits are the drafter's, for the committed block (pass
    0, target features) and the next pass (its own predicted features, LSTM continued, tree attention)."""
    target = tiny_model(arch)
    draft = random_draft(target)
    sequence = tiny_prompt(seed=3, length=16)
    mask = torch.ones_like(sequence)
    objective = FalconObjective(target, draft, passes=2).eval()
    predictions = objective.unrolled(sequence, mask, mask)
    anchor = 7  # ends a block of k = 2
    expected = drafter_logits_along_the_data(target, draft, sequence, anchor)
    assert [prediction.step for prediction in predictions] == [0, 1, 2, 3]
    for prediction in predictions:
        row = int(((prediction.rows == 0) & (prediction.anchors == anchor)).nonzero())
        torch.testing.assert_close(prediction.logits[row], expected[prediction.step], atol=1e-5, rtol=1e-5)
    assert all(bool((prediction.anchors % 2 == 1).all()) for prediction in predictions)


def test_glancing_reveals_true_features_in_proportion_to_mistakes():
    target = tiny_model("llama")
    sequence = torch.cat([tiny_prompt(seed=seed, length=20) for seed in range(2)])
    mask = torch.ones_like(sequence)
    objective = FalconObjective(target, random_draft(target), passes=2, glance_ratio=0.5).train()
    pass0 = objective.unrolled(sequence, mask, mask)[:2]
    mistakes = torch.zeros(2)
    for prediction in pass0:
        mistakes.index_add_(0, prediction.rows, (objective.predicted_tokens(prediction)
                                                 != prediction.reference).float())
    torch.manual_seed(0)
    glance = objective._glance_rows(pass0, 2, 19, 20, "cpu")
    assert glance.sum(1).tolist() == (0.5 * mistakes).round().long().tolist()
    assert not glance[:, 20 - 1 - 2:].any()
    objective.glance_ratio = 0.0
    assert not objective._glance_rows(pass0, 2, 19, 20, "cpu").any()
    hook = glance_schedule(0.45, 0.1, 100)
    hook(objective, 0)
    assert objective.glance_ratio == pytest.approx(0.45)
    hook(objective, 50)
    assert objective.glance_ratio == pytest.approx(0.275)
    hook(objective, 400)
    assert objective.glance_ratio == pytest.approx(0.1)


def test_training_raises_agreement_and_regresses_features():
    target = tiny_model("llama")
    sequences = torch.cat([plain(target, tiny_prompt(seed=seed, length=6), max_new_tokens=20) for seed in range(4)])
    mask = torch.ones_like(sequences)
    torch.manual_seed(0)
    untrained = FalconObjective(target, FalconDraft.for_target(target)).eval()(sequences, mask, mask)
    trained = FalconObjective(target, fitted_draft(target, sequences, steps=100)).eval()(sequences, mask, mask)
    assert float(trained["loss"]) < float(untrained["loss"].detach())
    assert bool((trained["feature_losses"] < 0.5 * untrained["feature_losses"]).all())
    for step in range(4):
        assert float(trained["step_top1"][step]) > float(untrained["step_top1"][step]) + 0.3


# ---------------------------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_random_drafter_is_greedy_identical(arch, tree):
    """Perturbed untrained drafter: almost nothing is accepted, every step corrects."""
    target = tiny_model(arch)
    prompt = tiny_prompt(seed=1)
    drafter = FalconDrafter(random_draft(target), tree=tree, top_k=3, budget=10)
    assert_greedy_identical(target, plain(target, prompt), speculative(target, prompt, drafter))
    assert drafter.stats.mean_accepted_tokens < 1.5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_fitted_drafter_is_accepted_and_greedy_identical(arch, tree):
    target = tiny_model(arch)
    prompt = tiny_prompt(seed=2, length=8)
    expected = plain(target, prompt, max_new_tokens=40)
    drafter = FalconDrafter(fitted_draft(target, expected), tree=tree, top_k=3, budget=10)
    assert_greedy_identical(target, expected, speculative(target, prompt, drafter, max_new_tokens=40))
    assert drafter.stats.mean_accepted_tokens > 2.5


def test_trimmed_draft_vocabulary_generate_kwargs_odd_depth_and_one_token_prompt_are_greedy_identical():
    target = tiny_model("llama")
    prompt = tiny_prompt(seed=2, length=8)
    expected = plain(target, prompt, max_new_tokens=40)
    vocabulary = DraftVocabulary(torch.unique(torch.cat([expected[0], torch.arange(1, 40)])), 96)
    draft = fitted_draft(target, expected, draft_vocab=vocabulary)
    drafter = FalconDrafter(draft, top_k=3)
    assert_greedy_identical(target, expected, speculative(target, prompt, drafter, max_new_tokens=40))
    assert drafter.stats.mean_accepted_tokens > 2.5
    chain = FalconDrafter(draft)
    got = speculative(target, prompt, chain, max_new_tokens=40, tree="chain", tree_depth=3)
    assert_greedy_identical(target, expected, got)
    assert chain.stats.drafted_tokens <= 3 * chain.stats.target_forwards  # the call's depth: one pass and a half
    one = prompt[:, :1]
    assert_greedy_identical(target, plain(target, one), speculative(target, one, FalconDrafter(random_draft(target))))


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
    draft = fitted_draft(target, samples, steps=60, lr=0.02)
    processors = plain_logits_processors(target, PROMPT, **GENERATION)
    return target, draft, exact_joint_distribution(target, PROMPT, processors, SAMPLED_TOKENS)


def sampled_pvalue(setup, monkeypatch, verification):
    target, draft, exact = setup
    spy = AcceptedDepthSpy(monkeypatch, verification)
    torch.manual_seed(1234)
    tokens = sample_generations(target, PROMPT, lambda: FalconDrafter(draft, top_k=2, budget=6), SAMPLES,
                                verification=verification, **GENERATION)
    return chi_square_pvalue(joint_counts(tokens, VOCAB, SAMPLED_TOKENS), exact), spy


@pytest.mark.parametrize("verification", ["rrs", "rrs_without_replacement"])
def test_sampled_tokens_follow_the_target_distribution(sampling_setup, monkeypatch, verification):
    pvalue, spy = sampled_pvalue(sampling_setup, monkeypatch, verification)
    print(f"\nfalcon {verification}: p = {pvalue:.3g}, steps by accepted draft tokens {sorted(spy.counts.items())}")
    assert spy.counts.get(0, 0) >= SAMPLES // 10
    assert spy.steps_reaching(2) >= SAMPLES // 10
    assert pvalue > 1e-3


def test_negative_control_accepting_every_draft_is_detected(sampling_setup, monkeypatch):
    accept_every_draft_token(monkeypatch)
    pvalue, _ = sampled_pvalue(sampling_setup, monkeypatch, "rrs")
    print(f"\nfalcon negative control: p = {pvalue:.3g}")
    assert pvalue < 1e-6


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe, num_layers", [("smollm2-135m", 30), ("qwen2.5-coder-1.5b", 28)])
def test_recipes_read_the_final_feature_from_the_cache(recipe, num_layers):
    """The SmolLM2 and Qwen2.5-Coder-1.5B recipes, checked on a tiny Qwen2 with the real layer count."""
    config = load_config(f"configs/falcon/{recipe}.yaml")
    method = get_method("falcon")
    assert method.validate(config) == []
    assert method.batch_features(config) == [FINAL]  # the target never runs in training
    target = tiny_model("qwen2", num_hidden_layers=num_layers)
    section = config.falcon
    drafter = FalconDrafter(random_draft(target, block_size=section.block_size, num_passes=section.num_passes),
                            top_k=section.tree_top_k, budget=section.tree_budget)
    assert drafter.default_tree_spec.depth == section.block_size * section.num_passes
    prompt = tiny_prompt(seed=5)
    assert_greedy_identical(target, plain(target, prompt, 8), speculative(target, prompt, drafter, 8))


def test_exported_in_the_package():
    assert hf_spec.FalconDrafter is FalconDrafter and hf_spec.FalconDraft is FalconDraft
