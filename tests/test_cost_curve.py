"""The target's cost curve c(k)/c(1) (hf_spec.bench.cost, `hf-spec cost`): what it measures and writes."""

from __future__ import annotations

import json

import pytest
import torch

from hf_spec import cli
from hf_spec.bench.cost import cost_curve, curve_line, forward_seconds
from tests.conftest import tiny_model


def test_cost_curve_is_relative_to_a_one_token_forward_at_each_context():
    model = tiny_model("llama", dtype=torch.float32)
    curve = cost_curve(model, contexts=(8, 32), new_tokens=(1, 2, 4), repeats=2)
    assert curve["backend"] == "default" and list(curve["contexts"]) == [8, 32]
    for values in curve["contexts"].values():
        assert values["ratio"][1] == 1.0 and all(seconds > 0 for seconds in values["seconds"].values())
        assert values["ratio"][4] == pytest.approx(values["seconds"][4] / values["seconds"][1])
    assert curve_line(curve).startswith("target forward cost c(k)/c(1), default kernels, after 8 cached tokens: k=2")
    with pytest.raises(ValueError, match="include 1"):
        cost_curve(model, contexts=(8,), new_tokens=(2, 4))


def test_each_forward_sees_the_same_context():
    """The cache is rolled back after every timed forward: timing many does not grow it."""
    model = tiny_model("llama", dtype=torch.float32)
    calls = []
    original = model.forward

    def spy(*args, **kwargs):
        cache = kwargs["past_key_values"]
        calls.append(cache.get_seq_length())
        return original(*args, **kwargs)

    model.forward = spy
    forward_seconds(model, context=10, new_tokens=3, repeats=4)
    assert calls == [0] + [10] * 5  # the prefill, then a warm-up and 4 timed forwards after exactly 10 tokens


def test_cli_writes_results(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    code = cli.main(["cost", "--target", str(folder), "--contexts", "8", "--new-tokens", "1", "2", "--repeats", "1",
                     "--threads", "1", "--out", str(tmp_path / "out")])
    assert code == 0
    assert "| cached tokens | t(1), ms | c(2) |" in capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["threads"] == 1 and payload["cost_curves"][0]["contexts"]["8"]["ratio"]["1"] == 1.0
