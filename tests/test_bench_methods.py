"""Method discovery: exported drafters, verification rules, specs, applicability and the config glue."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

import hf_spec
from hf_spec.bench import config as bench_config
from hf_spec.bench import methods as bench_methods
from hf_spec.bench.methods import build_methods, parse_spec
from hf_spec.bench.presets import PRESETS
from hf_spec.drafters.early_exit import early_exit_model
from hf_spec.engine.tree import DraftTree
from tests.conftest import tiny_model, tiny_prompt

GREEDY = {"max_new_tokens": 4, "do_sample": False}


class EchoDrafter(hf_spec.Drafter):
    """A drafter hf_spec does not export (yet): proposes the last token again."""

    def __init__(self, num_tokens: int = 2):
        super().__init__()
        self.num_tokens = num_tokens

    def propose(self, request):
        return DraftTree.from_sequences([[int(request.input_ids[0, -1])] * self.num_tokens],
                                        device=request.input_ids.device)


class HeadsDrafter(EchoDrafter):
    def __init__(self, heads_path: str):
        super().__init__()


def test_every_exported_drafter_is_discovered():
    exported = {name for name in hf_spec.__all__ if isinstance(getattr(hf_spec, name), type)
                and issubclass(getattr(hf_spec, name), hf_spec.Drafter) and getattr(hf_spec, name) is not hf_spec.Drafter}
    names = bench_methods.available_methods(do_sample=False)
    assert exported <= set(names)
    assert list(names)[0] == "plain"
    assert {"transformers_assisted", "transformers_prompt_lookup"} <= set(names)


def test_a_newly_exported_drafter_appears_and_unbuildable_ones_are_skipped(monkeypatch):
    monkeypatch.setattr(hf_spec, "EchoDrafter", EchoDrafter, raising=False)
    monkeypatch.setattr(hf_spec, "HeadsDrafter", HeadsDrafter, raising=False)
    monkeypatch.setattr(hf_spec, "__all__", [*hf_spec.__all__, "EchoDrafter", "HeadsDrafter"])
    target = tiny_model(num_hidden_layers=4)
    methods, skipped = build_methods(target, early_exit_model(target, 2), GREEDY, ["*Drafter*"])
    names = [method.name for method in methods]
    assert "EchoDrafter" in names
    assert "needs heads_path" in skipped["HeadsDrafter"]
    ids = tiny_prompt()
    echo = next(method for method in methods if method.name == "EchoDrafter")
    assert echo.generate(ids).equal(methods[0].generate(ids))  # baseline first, identical output


def test_draft_methods_are_skipped_without_a_draft():
    methods, skipped = build_methods(tiny_model(), None, GREEDY)
    names = {method.name for method in methods}
    assert "PromptLookupDrafter" in names and "transformers_prompt_lookup" in names
    assert skipped["transformers_assisted"] == "needs a draft model"
    assert skipped["DraftModelDrafter"] == "needs a draft model"


def test_verification_rules_for_the_decoding_mode_become_variants():
    rules = bench_methods.verification_rules()
    sampling = bench_methods.extra_verification_rules(do_sample=True)
    greedy = bench_methods.extra_verification_rules(do_sample=False)
    for name in sampling:
        assert rules[name].sampling
    for name in greedy:
        assert not rules[name].sampling
    distinct_sampling_rules = {id(rule) for rule in rules.values() if getattr(rule, "sampling", False)}
    assert len(sampling) == max(len(distinct_sampling_rules) - 1, 0)  # all but the default, aliases once
    names = bench_methods.available_methods(do_sample=True)
    for rule in sampling:
        assert f"hf_spec_prompt_lookup_tree+verification={rule}" in names
        assert f"DraftModelDrafter(tree='static', verification={rule!r})" in names


def test_tree_shapes_only_for_drafters_that_grow_trees():
    from hf_spec.engine.dynamic_tree import TREE_SHAPES

    names = bench_methods.available_methods(do_sample=False)
    for shape in TREE_SHAPES:
        if shape != "chain":  # DraftModelDrafter's default, measured as DraftModelDrafter
            assert f"DraftModelDrafter(tree={shape!r})" in names
    assert not any(name.startswith("PromptLookupDrafter(tree=") for name in names)


def test_spec_sends_constructor_arguments_to_the_drafter_and_the_rest_to_generate():
    assert parse_spec("PromptLookupDrafter(max_candidates=4, verification='greedy')") == (
        "PromptLookupDrafter", None, {"max_candidates": 4, "verification": "greedy"})
    assert parse_spec("PromptLookupDrafter") == ("PromptLookupDrafter", None, {})
    assert parse_spec("MedusaDrafter.from_pretrained(path_or_id='/heads', tree='dynamic')") == (
        "MedusaDrafter", "from_pretrained", {"path_or_id": "/heads", "tree": "dynamic"})
    for bad in ("PromptLookupDrafter(max_candidates=len('x'))", "PromptLookupDrafter(4)",
                "os.system('x')()", "PromptLookupDrafter(**{'a': 1})"):
        with pytest.raises(ValueError, match="Cannot read method spec"):
            parse_spec(bad)
    target = tiny_model()
    spec = "PromptLookupDrafter(num_tokens=3, verification='greedy')"
    methods, _ = build_methods(target, None, GREEDY, [spec])
    method = methods[1]
    assert method.name == spec and method.drafter.num_tokens == 3 and "verification='greedy'" in method.description
    ids = tiny_prompt()
    assert method.generate(ids).equal(methods[0].generate(ids))


class PretrainedEchoDrafter(EchoDrafter):
    """Stands for a drafter with trained weights: built with a classmethod that needs the target."""

    @classmethod
    def from_pretrained(cls, path_or_id: str, target, num_tokens: int = 2):
        drafter = cls(num_tokens)
        drafter.loaded = (path_or_id, target)
        return drafter


def test_spec_with_a_classmethod_constructor(monkeypatch):
    monkeypatch.setattr(hf_spec, "PretrainedEchoDrafter", PretrainedEchoDrafter, raising=False)
    target = tiny_model()
    spec = "PretrainedEchoDrafter.from_pretrained(path_or_id='/heads', num_tokens=3, verification='greedy')"
    methods, _ = build_methods(target, None, GREEDY, [spec])
    method = methods[1]
    assert method.name == spec
    assert method.drafter.loaded == ("/heads", target) and method.drafter.num_tokens == 3
    assert "verification='greedy'" in method.description
    with pytest.raises(ValueError, match="not a classmethod"):
        build_methods(target, None, GREEDY, ["PretrainedEchoDrafter.propose(x=1)"])


def test_methods_are_not_named_with_the_model_prefix():
    for old in ("hf_spec:PromptLookupDrafter", "hf_spec:PromptLookupDrafter(num_tokens=3)"):
        with pytest.raises(ValueError, match="the hf_spec: prefix names models.*'PromptLookupDrafter"):
            build_methods(tiny_model(), None, GREEDY, [old])


@pytest.mark.parametrize("name", ["hf_spec_medusa_trained", "hf_spec_eagle3_trained"])
def test_committed_trained_drafters_are_skipped_with_the_reason_on_another_target(name):
    methods, skipped = build_methods(tiny_model(), None, GREEDY, [name])
    assert [method.name for method in methods] == ["plain"]
    assert "trained for another model" in skipped[name]


def test_unknown_method_names_fail_clearly():
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        build_methods(tiny_model(), None, GREEDY, ["nope"])
    with pytest.raises(ValueError, match="Unknown drafter"):
        build_methods(tiny_model(), None, GREEDY, ["NoSuchDrafter(x=1)"])


def test_transformers_assisted_starts_every_call_with_the_same_draft_schedule():
    target = tiny_model(num_hidden_layers=4)
    draft = early_exit_model(target, 2)
    draft.generation_config = GenerationConfig(num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic")
    method = bench_methods.transformers_assisted(target, draft, GREEDY)
    method.generate(tiny_prompt(), max_new_tokens=12)
    assert draft.generation_config.num_assistant_tokens == 3


def test_config_precedence_and_lists(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text("limit: 7\nmax-new-tokens: 99\nmethods: plain, PromptLookupDrafter(num_tokens=4, max_ngram=2)\n")
    config = bench_config.make_config(str(path), preset="quick", max_new_tokens=33, repeats=None)
    assert config.limit == 7  # the file overrides the quick preset
    assert config.max_new_tokens == 33  # flags override the file
    assert config.repeats == PRESETS["quick"]["repeats"]  # unset flags do not override
    assert config.methods == ["plain", "PromptLookupDrafter(num_tokens=4, max_ngram=2)"]
    assert config.greedy and config.output_dir().name == "smollm2-135m-instruct-greedy"
    with pytest.raises(ValueError, match="Unknown benchmark setting"):
        bench_config.make_config(limt=3)
    with pytest.raises(ValueError, match="temperature"):
        bench_config.make_config(temperature=-1.0)
    with pytest.raises(ValueError, match="Unknown preset 'slow'"):
        bench_config.make_config(preset="slow")
    with pytest.raises(ValueError, match="table must be one of"):
        bench_config.make_config(table="wide")


def test_output_folder_is_named_after_the_model_without_its_prefix():
    assert bench_config.make_config(target="hf_spec:qwen2.5-coder-1.5b-instruct").output_dir().name == (
        "qwen2.5-coder-1.5b-instruct-greedy")
    assert bench_config.make_config(target="/models/mine", temperature=0.7).output_dir().name == "mine-t0.7"


def test_demo_preset_runs_without_an_early_exit_draft_unless_asked():
    demo = bench_config.make_config(preset="demo")
    assert demo.early_exit_layers is None and demo.table == "demo" and demo.threads <= 2
    assert set(demo.labels) == set(demo.methods) and demo.methods[0] == "plain"
    assert set(demo.tasks) <= {"code_edit", "extraction", "summarization", "qa"}  # input-grounded only
    assert bench_config.make_config(preset="demo", early_exit_layers=8).early_exit_layers == 8
    with pytest.raises(ValueError, match="early_exit_layers must be at least 1"):
        bench_config.make_config(early_exit_layers=0)


def test_limit_per_task_group_from_flag_and_file(tmp_path):
    assert bench_config.make_config(limit="code=3, math=2, default=1").limit == {"code": 3, "math": 2, "default": 1}
    assert bench_config.make_config(limit="4").limit == 4
    path = tmp_path / "bench.yaml"
    path.write_text("limit: {mt_bench: 2, default: 1}\n")
    assert bench_config.make_config(str(path)).limit == {"mt_bench": 2, "default": 1}
    with pytest.raises(ValueError, match="unknown task group 'cod'"):
        bench_config.make_config(limit="cod=3")
    with pytest.raises(ValueError, match="whole number >= 1"):
        bench_config.make_config(limit={"code": 0})
    with pytest.raises(ValueError, match="neither a number nor"):
        bench_config.make_config(limit="many")


def test_a_drafter_skipped_by_discovery_is_not_reported_unmeasured_when_a_spec_of_it_ran():
    from types import SimpleNamespace

    from hf_spec.bench.runner import _measured_as_spec

    ran = [SimpleNamespace(name="plain"), SimpleNamespace(name="MedusaDrafter.from_pretrained(path_or_id='h')")]
    assert _measured_as_spec("MedusaDrafter", ran)
    assert not _measured_as_spec("MedusaDrafterX", ran)
    assert not _measured_as_spec("DraftModelDrafter", ran)
