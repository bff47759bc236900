"""Draft vocabularies (VocabTrim / FR-Spec / EAGLE-3's d2t): the maps, persistence, a trimmed draft model that
scores only the subset, and exactness through generate(): greedy identity and the sampling distribution.

Sampling setup: the 8-token peaked target of tests/sampling_helpers.py, its perturbed overconfident copy as the
draft, trimmed to the target's 4 most frequent output tokens (80% of plain 3-token generations contain a token
the draft can never propose), temperature, top-k and repetition penalty, 400 generate() calls, chi-square on
the joint distribution of the three generated tokens (seed 1234). Measured: chain p = 0.88, static tree
p = 0.31; the negative control (tokens drawn from the trimmed distribution, the untrimmed one reported as q)
p = 1.4e-51.
"""

from __future__ import annotations

import pytest
import torch

import hf_spec
from hf_spec.drafters.draft_vocab import DraftVocabulary, TrimmedOutputModel
from hf_spec.errors import UnsupportedError
from tests.conftest import tiny_model, tiny_prompt
from tests.sampling_helpers import (
    exact_joint_distribution,
    joint_counts,
    peaked_tiny_llama,
    perturbed_copy,
    plain_logits_processors,
    sample_generations,
)
from tests.stats_helpers import chi_square_pvalue


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Many tiny forwards: one thread avoids thread-pool overhead that dominates on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the maps
def test_most_frequent_tokens_are_selected_and_mapped_like_eagle3():
    counts = torch.tensor([5, 0, 9, 1, 9, 0, 3, 7])
    vocabulary = DraftVocabulary.from_token_counts(counts, 4, always_include=[5])
    assert vocabulary.draft_to_target.tolist() == [2, 4, 5, 7]  # 9, 9, forced, 7; draft ids in target order
    assert torch.equal(vocabulary.draft_to_target, torch.arange(4) + vocabulary.d2t)  # target = draft + d2t[draft]
    assert vocabulary.d2t.dtype == torch.int64 and vocabulary.t2d.dtype == torch.bool
    assert vocabulary.t2d.tolist() == [False, False, True, False, True, True, False, True]
    assert vocabulary.to_draft_ids(torch.tensor([7, 0, 2])).tolist() == [3, -1, 0]
    assert vocabulary.coverage(counts) == pytest.approx((9 + 9 + 0 + 7) / 34)
    assert DraftVocabulary.from_token_counts(torch.tensor([1, 1, 1, 1]), 2).draft_to_target.tolist() == [0, 1]
    with pytest.raises(ValueError, match="twice"):
        DraftVocabulary([1, 1], 4)
    with pytest.raises(ValueError, match="size"):
        DraftVocabulary.from_token_counts(counts, 9)


def test_trimmed_distributions_are_exactly_zero_outside_the_subset():
    vocabulary = DraftVocabulary([1, 3, 4], 6)
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    full = vocabulary.to_target_logits(logits)
    assert full.shape == (2, 6) and torch.isinf(full[:, [0, 2, 5]]).all()
    probs = torch.softmax(full, -1)
    torch.testing.assert_close(probs, vocabulary.to_target_probs(torch.softmax(logits, -1)))
    assert (probs[:, [0, 2, 5]] == 0).all() and torch.allclose(probs.sum(-1), torch.ones(2, dtype=probs.dtype))
    assert full[0].argmax().item() == vocabulary.to_target_ids(logits[0].argmax()).item() == 4


def test_save_and_load_round_trip_and_corruption_is_refused(tmp_path):
    vocabulary = DraftVocabulary.from_token_counts(torch.arange(50.0), 7, metadata={"source": "test"})
    vocabulary.save(tmp_path)
    loaded = DraftVocabulary.load(tmp_path)
    assert loaded == vocabulary and loaded.metadata["source"] == "test"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "draft_vocab.safetensors"))
    tensors["t2d"][0] = not bool(tensors["t2d"][0])
    save_file(tensors, str(tmp_path / "draft_vocab.safetensors"))
    with pytest.raises(ValueError, match="inconsistent"):
        DraftVocabulary.load(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trimmed_model_scores_the_subset_like_the_full_model(arch):
    model = tiny_model(arch, seed=1)
    vocabulary = DraftVocabulary(torch.arange(0, 96, 3), 96)
    ids = tiny_prompt(seed=2)
    trimmed = TrimmedOutputModel(model, vocabulary)
    assert trimmed.weight.shape == (32, 32) and trimmed.config is model.config
    with torch.no_grad():
        full = model(ids).logits
        mine = trimmed(input_ids=ids).logits
        last = trimmed(input_ids=ids, logits_to_keep=1).logits
    torch.testing.assert_close(mine[..., vocabulary.draft_to_target], full[..., vocabulary.draft_to_target])
    assert torch.isinf(mine[..., 1]).all()
    torch.testing.assert_close(last[:, 0], mine[:, -1])
    with pytest.raises(UnsupportedError, match="draft vocabulary maps"):
        target = tiny_model(arch, seed=0, vocab_size=80)
        target.generate(tiny_prompt(seed=2, vocab=80), max_new_tokens=2,
                        assistant_model=hf_spec.DraftModelDrafter(tiny_model(arch, seed=1, vocab_size=80),
                                                                  draft_vocab=vocabulary))


# ---------------------------------------------------------------------------------------------- greedy identity
@pytest.fixture(scope="module")
def greedy_pair():
    """A float64 target and a draft close to it, and a 12-token vocabulary from the target's own outputs."""
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, relative_noise=0.05, seed=3)
    counts = torch.zeros(96)
    for seed in range(6):
        out = target.generate(tiny_prompt(seed=seed, length=10), max_new_tokens=30, do_sample=False)
        counts += torch.bincount(out[0, 10:], minlength=96)
    return target, draft, DraftVocabulary.from_token_counts(counts, 12)


@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_greedy_output_with_a_trimmed_draft_is_plain_generate(greedy_pair, tree):
    target, draft, vocabulary = greedy_pair
    accepted, outside = 0, 0
    for seed in (6, 8):
        prompt = tiny_prompt(seed=seed, length=10)
        plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
        drafter = hf_spec.DraftModelDrafter(draft, num_tokens=4, tree=tree, draft_vocab=vocabulary)
        assert torch.equal(target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=drafter,
                                           draft_length="fixed"), plain)
        accepted += drafter.stats.accepted_tokens
        outside += int((~vocabulary.contains(plain[0, 10:])).sum())
    assert accepted >= 6 and outside >= 6  # drafts were accepted, and the target emitted tokens the draft cannot


# ---------------------------------------------------------------------------------------------- sampling
VOCAB = 8
DEPTH = 3
SAMPLES = 400
SEED = 1234
GENERATION = dict(do_sample=True, temperature=0.8, top_k=7, repetition_penalty=1.2, max_new_tokens=DEPTH)
PROMPT = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])


class ReportsUntrimmedDistribution(hf_spec.DraftModelDrafter):
    """BROKEN: draws each chain token from the trimmed distribution but reports the full-vocabulary one as ``q``
    (the sampled-from and reported distributions disagree: rejection sampling is then biased)."""

    def _pick(self, scores, distribution):
        tokens, _ = super()._pick(scores, distribution)
        with torch.no_grad():
            full = self.draft_model(input_ids=self._cached_ids[None]).logits[:, -1]
        processed = self.logits_processor(self._cached_ids[None], full.double())
        return tokens, [torch.softmax(processed[0], -1).to(scores.dtype)]


@pytest.fixture(scope="module")
def sampling_case():
    target = peaked_tiny_llama(VOCAB)
    draft = perturbed_copy(target, relative_noise=0.2, seed=2, confidence=1.4)
    processors = plain_logits_processors(target, PROMPT, **GENERATION)
    exact = exact_joint_distribution(target, PROMPT, processors, DEPTH)
    emitted = sum(exact.sum(dim=[d for d in range(DEPTH) if d != position]) for position in range(DEPTH))
    vocabulary = DraftVocabulary.from_token_counts(emitted, 4)  # the target's 4 most frequent outputs
    return target, draft, exact, vocabulary


def sampled_pvalue(case, make_drafter) -> float:
    target, _, exact, _ = case
    torch.manual_seed(SEED)
    tokens = sample_generations(target, PROMPT, make_drafter, SAMPLES, **GENERATION)
    return chi_square_pvalue(joint_counts(tokens, VOCAB, DEPTH), exact)


@pytest.mark.parametrize("tree", ["chain", "static"])
def test_sampling_with_a_trimmed_draft_follows_the_target(sampling_case, tree):
    _, draft, exact, vocabulary = sampling_case
    inside = vocabulary.t2d.double()
    all_inside = float((exact * inside[:, None, None] * inside[None, :, None] * inside[None, None, :]).sum())
    assert 1 - all_inside > 0.3  # most plain generations hold a token the trimmed draft can never propose
    make = lambda: hf_spec.DraftModelDrafter(draft, num_tokens=DEPTH, tree=tree, draft_vocab=vocabulary)  # noqa: E731
    pvalue = sampled_pvalue(sampling_case, make)
    print(f"trimmed draft, {tree}: p = {pvalue:.3g}")
    assert pvalue > 1e-3


def test_negative_control_reporting_the_untrimmed_distribution_is_detected(sampling_case):
    _, draft, _, vocabulary = sampling_case
    pvalue = sampled_pvalue(sampling_case, lambda: ReportsUntrimmedDistribution(draft, num_tokens=DEPTH,
                                                                                draft_vocab=vocabulary))
    print(f"untrimmed q reported for trimmed draws: p = {pvalue:.3g}")
    assert pvalue < 1e-6


# ---------------------------------------------------------------------------------------------- selection from data
def test_vocabulary_is_selected_from_the_assistant_tokens_of_prepared_data(tmp_path):
    from hf_spec.training.data_config import DataSection
    from hf_spec.training.models import load_target
    from hf_spec.training.prepare_data import prepare_data
    from hf_spec.training.vocab_selection import count_assistant_tokens, coverage_table, select_draft_vocabulary
    from tests.helpers import sharegpt_file

    _, tokenizer = load_target("hf_spec:tiny-random-llama")
    config = DataSection(source=sharegpt_file(tmp_path, 10), num_conversations=10, max_length=160,
                         heldout_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(config, tokenizer, progress=False, log=lambda line: None)
    counts = count_assistant_tokens(prepared, "train", len(tokenizer))
    expected = torch.zeros(len(tokenizer), dtype=torch.float64)
    train = prepared.dataset("train")
    for index in range(len(train)):
        row = train[index]
        expected += torch.bincount(row["input_ids"][row["loss_mask"].bool()], minlength=len(tokenizer)).double()
    assert torch.equal(counts, expected) and counts.sum() > 0
    vocabulary = select_draft_vocabulary(prepared, 8, len(tokenizer), always_include=[tokenizer.eos_token_id])
    assert bool(vocabulary.t2d[tokenizer.eos_token_id]) and vocabulary.size == 8
    top7 = set(torch.sort(-counts.index_fill(0, torch.tensor([tokenizer.eos_token_id]), 0), stable=True).indices[:7].tolist())
    assert top7 <= set(vocabulary.draft_to_target.tolist())
    assert 0 < vocabulary.metadata["coverage_of_heldout_tokens"] <= 1
    table = coverage_table(prepared, [4, 16, 64], len(tokenizer))
    assert [row["train_coverage"] for row in table] == sorted(row["train_coverage"] for row in table)
