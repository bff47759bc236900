"""The drafter protocol: target features of every committed position, accepted node indices, no second pass."""

from __future__ import annotations

import pytest
import torch

import hf_spec
from hf_spec.engine.features import FINAL, capture_features, resolve_layers
from tests.helpers import perturbed_copy
from tests.conftest import ARCHITECTURES, tiny_model, tiny_prompt

MAX_NEW = 30


class RecordingDrafter(hf_spec.DraftModelDrafter):
    """A tree drafter (perturbed copy of the target) that records what the engine gives it."""

    def __init__(self, draft, layers, **kwargs):
        super().__init__(draft, **kwargs)
        self.target_features = layers
        self.requests, self.outcomes = [], []

    def propose(self, request):
        self.requests.append(request)
        return super().propose(request)

    def observe(self, outcome):
        self.outcomes.append(outcome)
        super().observe(outcome)


def reference_features(model, sequence, layers):
    """The same layers from one plain forward over the whole final sequence."""
    with capture_features(model, resolve_layers(model, layers)) as store, torch.no_grad():
        model(sequence)
    return store.features()


CASES = [(arch, dict(num_tokens=3, top_k=3)) for arch in ARCHITECTURES] + [
    ("llama", dict(num_tokens=4)), ("qwen2", dict(num_tokens=3, tree="dynamic", tree_budget=10))]


@pytest.mark.parametrize("arch,tree", CASES)
def test_features_of_every_committed_position_in_order(arch, tree):
    target = tiny_model(arch)
    layers = (0, 1, -1, FINAL)  # embeddings, input of layer 1, last layer before the norm, after the norm
    drafter = RecordingDrafter(perturbed_copy(target, 0.2), layers, **tree)
    prompt = tiny_prompt(3)
    out = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    assert torch.equal(out, target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False))

    given = torch.cat([request.target_features for request in drafter.requests], dim=1)
    expected = reference_features(target, out, layers)
    # Every position but the last two (the final root, and the token after it that is never run) exactly once.
    final_request = drafter.requests[-1]
    covered = final_request.input_ids.shape[1] - 1
    assert given.shape == (1, covered, 4 * target.config.hidden_size)
    torch.testing.assert_close(given, expected[:, :covered], rtol=1e-9, atol=1e-9)
    for request in drafter.requests:  # the last row always produced the root
        assert request.target_features.shape[1] >= 1
        assert request.target_features.shape[1] + 1 <= request.input_ids.shape[1]
    assert max(outcome.num_accepted for outcome in drafter.outcomes) >= 2, "the draft should be accepted at depth 2+"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_observe_gets_the_accepted_path_and_the_target_token(arch):
    target = tiny_model(arch)
    drafter = RecordingDrafter(perturbed_copy(target, 0.2), (), num_tokens=3, top_k=3)
    prompt = tiny_prompt(5)
    out = target.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter)
    committed = out[0, prompt.shape[1]:].tolist()
    position = 0
    for request, outcome in zip(drafter.requests, drafter.outcomes):
        assert request.target_features is None
        tree, path = outcome.tree, outcome.accepted_nodes
        for parent, child in zip([-1] + path, path):
            assert tree.parent_list[child] == parent  # a root-to-leaf path, node by node
        tokens = [tree.token_list[node] for node in path]
        if outcome.next_token is not None:
            tokens.append(outcome.next_token)
        assert committed[position : position + len(tokens)] == tokens
        position += len(tokens)
    assert position == len(committed)
    assert any(0 < len(o.accepted_nodes) < max(o.tree.depths) for o in drafter.outcomes), "partial acceptance"
    assert any(o.tree.parent_list[o.accepted_nodes[0]] == -1 and o.accepted_nodes[0] > 0
               for o in drafter.outcomes if o.accepted_nodes), "a sibling other than the first was accepted"


def test_features_are_captured_during_the_verification_forward_only(monkeypatch):
    """No second target pass: one target forward per step plus the prefill."""
    target = tiny_model("llama")
    calls = []
    original = type(target).forward

    def counting_forward(self, *args, **kwargs):
        if self is target:
            calls.append(kwargs.get("input_ids", args[0] if args else None).shape[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "forward", counting_forward)
    drafter = RecordingDrafter(perturbed_copy(target, 0.2), (2, FINAL), num_tokens=3)
    target.generate(tiny_prompt(2), max_new_tokens=MAX_NEW, do_sample=False, assistant_model=drafter,
                    draft_length="fixed")  # the cost-aware default measures its cost curve with extra forwards
    assert len(calls) == drafter.stats.target_forwards + 1


def test_bad_feature_layers_are_refused():
    target = tiny_model("llama")  # 2 layers: valid names are -3..2 and "final"
    for layers in [(3,), (-4,), ("last",), (1, -2)]:
        drafter = RecordingDrafter(target, layers, num_tokens=2)
        with pytest.raises(hf_spec.UnsupportedError, match="layer"):
            target.generate(tiny_prompt(0), max_new_tokens=4, do_sample=False, assistant_model=drafter)
