"""The speculators export of an EAGLE-3 draft: loaded by the ``speculators`` library itself, it gives the draft
logits hf_spec computes, its ``d2t`` / ``t2d`` map the same tokens, and its config is what speculators writes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("speculators")

from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig  # noqa: E402

from hf_spec.drafters.draft_vocab import DraftVocabulary  # noqa: E402
from hf_spec.drafters.eagle3 import Eagle3Draft  # noqa: E402
from hf_spec.drafters.eagle3.speculators_format import export_speculators  # noqa: E402
from hf_spec.errors import UnsupportedError  # noqa: E402
from hf_spec.training.feature_cache import compute_features, feature_key  # noqa: E402
from tests.conftest import tiny_model, tiny_prompt  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = 3  # every feature layer is then the input of a decoder layer: output_hidden_states[i] is unambiguous


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    """A tiny float32 Llama target saved where speculators reads the verifier's config and embeddings."""
    target = tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS)
    path = tmp_path_factory.mktemp("verifier")
    target.save_pretrained(path)
    return target, path


def perturbed_draft(target, **kwargs) -> Eagle3Draft:
    torch.manual_seed(1)
    draft = Eagle3Draft.for_target(target, **kwargs)
    with torch.no_grad():  # norms and lm_head away from their initial values too
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return draft.eval()


def hf_spec_logits(draft: Eagle3Draft, target, sequence: torch.Tensor) -> torch.Tensor:
    """hf_spec's draft logits of every verified row: features at ``t`` with token ``t + 1``, causal, position ``t``."""
    layers = tuple(draft.config.feature_layers)
    features = compute_features(target, sequence, torch.ones_like(sequence), layers)
    fused = torch.cat([features[feature_key(layer)] for layer in layers], dim=-1)[:, :-1]
    rows = fused.shape[1]
    keys, values = draft.empty_cache("cpu")
    embeddings = target.get_input_embeddings()(sequence[:, 1:])
    with torch.no_grad():
        output, _, _ = draft.step(embeddings, draft.fuse(fused), torch.arange(rows)[None], keys, values,
                                  torch.ones(rows, rows, dtype=torch.bool).tril())
        return draft.logits(output)


def speculators_logits(model: Eagle3DraftModel, target, sequence: torch.Tensor) -> torch.Tensor:
    """The first training-time-test step of speculators' forward, its auxiliary states taken as vLLM defines
    them (``output_hidden_states[i]``: the input of decoder layer ``i``), aligned as its ``shift_batch`` does."""
    with torch.no_grad():
        states = target.model(sequence, output_hidden_states=True).hidden_states
        hidden = torch.cat([states[layer] for layer in model.config.eagle_aux_hidden_state_layer_ids], dim=-1)
        captured = []
        handle = model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            model(hidden_states=hidden[:, :-1], input_ids=sequence[:, 1:],
                  document_ids=torch.zeros_like(sequence[:, 1:]), ttt_steps=1)
        finally:
            handle.remove()
    return captured[0]


def load(folder) -> Eagle3DraftModel:
    """speculators' loader, embeddings from the verifier. ``load_verifier_weights`` fills only tables that are
    NaN after ``from_pretrained``; under transformers 5.23 (speculators 0.9.0 declares <= 5.19) the missing
    ``embed_tokens`` is left as uninitialised memory instead, so it is marked NaN and loaded again here."""
    model = Eagle3DraftModel.from_pretrained(folder).float().eval()
    with torch.no_grad():
        model.embed_tokens.weight.fill_(float("nan"))
    model.load_verifier_weights()
    return model


def test_export_with_a_draft_vocabulary_gives_hf_spec_logits(verifier, tmp_path):
    target, verifier_path = verifier
    vocabulary = DraftVocabulary(torch.tensor([0, 3, 4, 9, 17, 18, 40, 41, 60, 77, 90, 95]), 96)
    draft = perturbed_draft(target, draft_vocab=vocabulary, tree_depth=4)
    export_speculators(draft, tmp_path, verifier_name_or_path=str(verifier_path))
    model = load(tmp_path)

    # d2t holds offsets (target = draft + d2t), t2d marks the kept target ids: the same tokens both ways
    assert model.use_draft_vocab and model.d2t.dtype == torch.long and model.t2d.dtype == torch.bool
    torch.testing.assert_close(torch.arange(vocabulary.size) + model.d2t, vocabulary.draft_to_target)
    torch.testing.assert_close(model.t2d.nonzero().flatten(), vocabulary.draft_to_target)
    assert DraftVocabulary.from_d2t(model.d2t, model.t2d.numel()) == vocabulary
    # embeddings come from the verifier, the output projection from the export
    torch.testing.assert_close(model.embed_tokens.weight, target.get_input_embeddings().weight)
    torch.testing.assert_close(model.lm_head.weight, draft.lm_head.weight)

    sequence = tiny_prompt(seed=5, length=16)
    ours, theirs = hf_spec_logits(draft, target, sequence), speculators_logits(model, target, sequence)
    assert theirs.shape == ours.shape == (1, 15, vocabulary.size)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)

    # vLLM's compute_logits: scatter draft logits to arange(N) + d2t in a -inf row of target ids
    scattered = theirs.new_full((*theirs.shape[:-1], 96), float("-inf"))
    scattered[..., torch.arange(vocabulary.size) + model.d2t] = theirs
    torch.testing.assert_close(scattered, draft.to_target_logits(ours), rtol=1e-4, atol=1e-5)


def test_export_of_a_full_vocabulary_draft_with_unsorted_layers(verifier, tmp_path):
    target, verifier_path = verifier
    draft = perturbed_draft(target, feature_layers=[2, 0, 1])
    export_speculators(draft, tmp_path, verifier_name_or_path=str(verifier_path))
    model = load(tmp_path)
    assert not model.use_draft_vocab and model.d2t is None and model.t2d is None
    assert model.config.eagle_aux_hidden_state_layer_ids == [0, 1, 2]  # vLLM's order; fc columns permuted

    sequence = tiny_prompt(seed=6, length=12)
    ours, theirs = hf_spec_logits(draft, target, sequence), speculators_logits(model, target, sequence)
    assert theirs.shape == (1, 11, 96)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_config_is_what_speculators_writes(verifier, tmp_path):
    target, verifier_path = verifier
    draft = perturbed_draft(target, draft_vocab=DraftVocabulary(torch.arange(0, 96, 3), 96), tree_depth=6)
    export_speculators(draft, tmp_path, verifier_name_or_path=str(verifier_path))
    ours = json.loads((tmp_path / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert ours["speculators_config"]["verifier"] == {"name_or_path": str(verifier_path),
                                                      "architectures": ["LlamaForCausalLM"]}
    assert ours["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 6
    assert ours["transformer_layer_config"]["max_position_embeddings"] == target.config.max_position_embeddings

    theirs = Eagle3SpeculatorConfig.from_pretrained(tmp_path).to_dict()  # speculators' own serialisation
    for key, value in ours.items():
        if key != "transformer_layer_config":
            assert theirs[key] == value, key
    layer = theirs["transformer_layer_config"]
    for key, value in ours["transformer_layer_config"].items():
        if key != "rope_theta":  # transformers 5 folds it into rope_parameters
            assert layer[key] == value, key


def test_soft_capped_drafts_are_refused(verifier, tmp_path):
    target, verifier_path = verifier
    draft = perturbed_draft(target)
    draft.config.logit_softcapping = 30.0  # as for a Gemma-2 target
    with pytest.raises(UnsupportedError, match="soft-capping"):
        export_speculators(draft, tmp_path, verifier_name_or_path=str(verifier_path))
    assert not any(tmp_path.iterdir())
