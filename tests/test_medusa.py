"""Medusa heads and MedusaDrafter: config, checkpoints, trees, and greedy token identity with plain generate()."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import hf_spec
from hf_spec.drafters.medusa import (
    MedusaConfig,
    MedusaDrafter,
    MedusaHeads,
    RankTree,
    best_rank_tree,
    chain_paths,
    expected_accepted_length,
)
from hf_spec.engine.dynamic_tree import TreeSpec
from hf_spec.errors import UnsupportedError
from hf_spec.training.hub import CheckpointError
from tests.conftest import tiny_model, tiny_prompt
from tests.helpers import fitted_heads, plain

MAX_NEW = 32
COMMITTED_HEADS = Path(__file__).resolve().parents[1] / "artifacts" / "medusa-smollm2-135m-instruct"


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------- config
def test_config_round_trips_and_rejects_bad_values():
    config = MedusaConfig(hidden_size=32, vocab_size=96, num_heads=3, rank_paths=[[0], [1], [0, 0]],
                          head_rank_accuracies=[[0.5, 0.2], [0.3, 0.1], [0.2, 0.1]])
    assert MedusaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="num_heads"):
        MedusaConfig(hidden_size=32, vocab_size=96, num_heads=0)
    with pytest.raises(ValueError, match="parent"):
        MedusaConfig(hidden_size=32, vocab_size=96, rank_paths=[[0, 0]])
    with pytest.raises(CheckpointError, match="Unknown Medusa config keys"):
        MedusaConfig.from_dict({**config.to_dict(), "surprise": 1})
    with pytest.raises(CheckpointError, match="newer"):
        MedusaConfig.from_dict({**config.to_dict(), "format_version": 99})


def test_untrained_heads_reproduce_the_targets_next_token_head():
    """ResBlocks start as the identity (W, b = 0), so head k initially equals the target's lm_head."""
    target = tiny_model("llama")
    heads = MedusaHeads.for_target(target, num_heads=2)
    hidden = torch.randn(5, 32, dtype=torch.float64)
    expected = target.lm_head(hidden)
    logits = heads(hidden, target.lm_head)
    assert logits.shape == (2, 5, 96)
    torch.testing.assert_close(logits[1], expected)
    own = MedusaHeads.for_target(target, num_heads=2, share_lm_head=False)
    torch.testing.assert_close(own(hidden)[0], expected)
    with pytest.raises(ValueError, match="lm_head"):
        heads(hidden)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("share", [True, False])
def test_save_and_load_round_trip(tmp_path, share):
    target = tiny_model("llama")
    heads = MedusaHeads.for_target(target, num_heads=3, num_layers=2, share_lm_head=share)
    with torch.no_grad():
        for param in heads.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    heads.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = MedusaHeads.from_pretrained(tmp_path, target=target)
    assert loaded.config == heads.config
    assert next(loaded.parameters()).dtype == torch.float64  # placed on the target's dtype
    hidden = torch.randn(4, 32, dtype=torch.float64)
    torch.testing.assert_close(loaded(hidden, target.lm_head), heads(hidden, target.lm_head))
    size = (tmp_path / "model.safetensors").stat().st_size
    assert (size < 60_000) == share  # shared lm_head: only the residual blocks are stored


def test_loading_checks_the_target(tmp_path):
    MedusaHeads.for_target(tiny_model("llama"), num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError, match="hidden size 32 \\(target: 64\\)"):
        MedusaHeads.from_pretrained(tmp_path, target=tiny_model("llama", hidden_size=64))
    with pytest.raises(UnsupportedError, match="vocabulary 96 \\(target's lm_head: 128\\)"):
        MedusaDrafter.from_pretrained(tmp_path, target=tiny_model("llama", vocab_size=128))
    heads = MedusaHeads.from_pretrained(tmp_path)
    target = tiny_model("llama", vocab_size=128)
    with pytest.raises(UnsupportedError, match="trained for another model"):
        target.generate(tiny_prompt(0, vocab=128), max_new_tokens=3, assistant_model=MedusaDrafter(heads))


def test_corrupt_or_mismatched_checkpoints_fail_clearly(tmp_path):
    MedusaHeads.for_target(tiny_model("llama"), num_heads=2).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        MedusaHeads.from_pretrained(tmp_path)
    weights.write_bytes(data)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_heads": 3}))
    with pytest.raises(CheckpointError, match="missing tensors"):
        MedusaHeads.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_layers": 1, "hidden_size": 16}))
    with pytest.raises(CheckpointError, match="shape"):
        MedusaHeads.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        MedusaHeads.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        MedusaHeads.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- trees
def test_best_rank_tree_maximises_expected_length():
    accuracies = [[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.05]]
    budget = 5
    tree = best_rank_tree(accuracies, budget)
    RankTree(tree)  # parents present and first
    all_nodes = [p for depth in range(1, 4) for p in itertools.product(range(3), repeat=depth)]
    valid_trees = (set(c) for c in itertools.combinations(all_nodes, budget)
                   if all(len(p) == 1 or p[:-1] in c for p in c))
    best = max(expected_accepted_length(list(c), accuracies) for c in valid_trees)
    assert expected_accepted_length(tree, accuracies) == pytest.approx(best)
    assert tree[0] == (0,) and len(tree) == budget
    assert expected_accepted_length(chain_paths(3), accuracies) == pytest.approx(1 + 0.6 + 0.24 + 0.072)


def test_rank_tree_layout():
    tree = RankTree([(0, 0), (1,), (0,), (0, 1), (0, 0, 0)])
    assert tree.paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert tree.parents == [-1, -1, 0, 0, 2]
    assert tree.depths == [1, 1, 2, 2, 3]
    assert tree.ranks == [0, 1, 0, 1, 0]
    assert tree.up_to_depth(1).paths == [(0,), (1,)]


def test_default_tree_comes_from_measured_accuracies():
    config = MedusaConfig(hidden_size=32, vocab_size=96, num_heads=2, default_num_nodes=3,
                          head_rank_accuracies=[[0.2, 0.19, 0.18], [0.9, 0.05]])
    drafter = MedusaDrafter(MedusaHeads(config))
    assert drafter.rank_paths == [(0,), (1,), (0, 0)]
    assert MedusaDrafter(MedusaHeads(config), tree="static").rank_paths == [(0,), (1,), (0, 0)]
    assert MedusaDrafter(MedusaHeads(config), tree="chain").rank_paths == [(0,), (0, 0)]
    assert MedusaDrafter(MedusaHeads(config), num_nodes=5).rank_paths == [(0,), (1,), (2,), (0, 0), (1, 0)]
    assert MedusaDrafter(MedusaHeads(config), rank_paths=[[1], [1, 0]]).rank_paths == [(1,), (1, 0)]


def test_tree_is_a_shape_and_rank_paths_are_the_static_tree():
    config = MedusaConfig(hidden_size=32, vocab_size=96, num_heads=2)
    with pytest.raises(ValueError, match="rank_paths="):
        MedusaDrafter(MedusaHeads(config), tree=[[0], [0, 0]])
    with pytest.raises(ValueError, match="one of"):
        MedusaDrafter(MedusaHeads(config), tree="bushy")
    with pytest.raises(ValueError, match="does not combine"):
        MedusaDrafter(MedusaHeads(config), tree="chain", rank_paths=[[0]])
    with pytest.raises(ValueError, match="num_nodes"):
        MedusaDrafter(MedusaHeads(config), rank_paths=[[0]], num_nodes=4)
    with pytest.raises(ValueError, match="parent"):
        MedusaDrafter(MedusaHeads(config), rank_paths=[[0, 0]])
    dynamic = MedusaDrafter(MedusaHeads(config), tree="dynamic", num_nodes=5)
    assert dynamic.default_dynamic_spec == TreeSpec("dynamic", budget=5)
    assert "tree='dynamic', nodes=5" in repr(dynamic)


def test_config_reads_the_old_tree_key_as_rank_paths():
    old = {"hidden_size": 32, "vocab_size": 96, "num_heads": 2, "tree": [[0], [0, 0]]}
    assert MedusaConfig.from_dict(old).rank_paths == [[0], [0, 0]]
    assert "tree" not in MedusaConfig.from_dict(old).to_dict()
    with pytest.raises(CheckpointError, match="both"):
        MedusaConfig.from_dict({**old, "rank_paths": [[0]]})
    committed = json.loads((COMMITTED_HEADS / "config.json").read_text())  # written with the "tree" key
    assert MedusaConfig.from_dict(committed).num_heads == committed["num_heads"]


# ---------------------------------------------------------------------------------------------- greedy identity
TREES = {"default": {}, "chain": {"tree": "chain"}, "dynamic": {"tree": "dynamic", "num_nodes": 6},
         "wide": {"rank_paths": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]}, "big": {"num_nodes": 40}}


@pytest.mark.parametrize("arch,tree", [("llama", tree) for tree in TREES] + [("qwen2", "default"), ("gemma3", "wide")])
def test_greedy_identity_with_random_heads(arch, tree):
    target = tiny_model(arch)
    heads = MedusaHeads.for_target(target, num_heads=3)
    with torch.no_grad():
        for param in heads.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    drafter = MedusaDrafter(heads, **TREES[tree])
    prompt = tiny_prompt(1)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter,
                          draft_length="fixed")
    assert torch.equal(got, plain(target, prompt)), f"{arch}/{tree}"
    assert drafter.stats.new_tokens == MAX_NEW
    if tree == "dynamic":  # a grown tree of 6 nodes, not the 3-head chain
        assert drafter.stats.drafted_tokens > 3 * drafter.stats.target_forwards


@pytest.fixture(scope="module")
def fitted():
    """(target, prompt, heads fitted to the target's continuation of the prompt), shared by the tests below."""
    target = tiny_model("llama")
    prompt = tiny_prompt(3)
    return target, prompt, fitted_heads(target, prompt)


def test_greedy_identity_with_heads_that_get_accepted(fitted):
    target, prompt, heads = fitted
    drafter = MedusaDrafter(heads, num_nodes=10)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, plain(target, prompt))
    stats = drafter.stats
    assert stats.accepted_tokens > MAX_NEW // 2, stats  # the heads really draft, and are really verified
    assert stats.target_forwards == MAX_NEW - stats.accepted_tokens
    for shape in ("chain", "static", "dynamic"):
        got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter,
                              tree=shape, tree_budget=6)
        assert torch.equal(got, plain(target, prompt)), shape
        assert drafter.stats.accepted_tokens > 0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_exact_length_and_one_token_prompt(max_new_tokens):
    target = tiny_model("llama")
    heads = MedusaHeads.for_target(target, num_heads=4)
    drafter = MedusaDrafter(heads, num_nodes=20)
    for prompt in (tiny_prompt(5), tiny_prompt(5, length=1)):
        got = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=drafter)
        assert torch.equal(got, plain(target, prompt, max_new_tokens))


def test_prompt_of_one_token_proposes_nothing_first():
    target = tiny_model("llama")
    drafter = MedusaDrafter(MedusaHeads.for_target(target, num_heads=2))
    target.generate(tiny_prompt(6, length=1), max_new_tokens=1, do_sample=False, assistant_model=drafter)
    assert drafter.stats.drafted_tokens == 0


def test_fitted_heads_on_a_tied_embedding_model():
    target = tiny_model("gemma3")
    prompt = tiny_prompt(4)
    drafter = MedusaDrafter(fitted_heads(target, prompt), tree="chain")
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, plain(target, prompt))
    assert drafter.stats.accepted_tokens > 0


def test_from_pretrained_local_folder(tmp_path, fitted):
    target, prompt, heads = fitted
    heads.save_pretrained(tmp_path)
    drafter = hf_spec.MedusaDrafter.from_pretrained(str(tmp_path), target=target, num_nodes=8)
    got = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, plain(target, prompt))
    assert drafter.stats.accepted_tokens > 0
    assert "MedusaDrafter(heads=3" in repr(drafter)
    chosen = hf_spec.MedusaDrafter.from_pretrained(str(tmp_path), target=target, rank_paths=[[1], [1, 0]])
    assert chosen.rank_paths == [(1,), (1, 0)]


@pytest.mark.parametrize("proposal", ["topk", "sample"])
def test_every_sampling_rule_of_the_engine_runs(fitted, proposal):
    """Whatever verification the engine applies (incl. the explicit, lossy 'typical'), the drafter serves it."""
    from hf_spec.engine.rules import RULES

    target, prompt, heads = fitted
    accepted = 0
    for name, rule in RULES.items():
        if not rule.sampling:
            continue
        # SpecHub draws two candidates per node
        tree = {"rank_paths": [[0], [1], [0, 0]]} if name == "spechub" else {"num_nodes": 8}
        drafter = MedusaDrafter(heads, **tree, proposal=proposal)
        torch.manual_seed(0)
        out = target.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.8, assistant_model=drafter,
                              verification=name)
        assert out.shape[1] == prompt.shape[1] + 12, name
        accepted += drafter.stats.accepted_tokens
    assert accepted > 0
