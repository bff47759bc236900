"""hf_spec's loop as a ``custom_generate`` Hub repo: generated from the package (the committed folder is what a
fresh build writes), loadable by transformers alone, greedy identical to plain generate() from a local Hub."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_spec import custom_generate_repo
from hf_spec.errors import UnsupportedError
from hf_spec.hub_generate import drafter_from_arguments
from tests.test_hub_medusa import REPO, LocalHub, hub_env, run_python

# The client knows transformers and nothing of hf_spec: it must not import it, directly or through the repo.
CLIENT = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
target = LlamaForCausalLM(config).eval()
torch.manual_seed(1)
draft = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})).eval()
prompt = torch.tensor([[1, 5, 9, 5, 9, 5, 9, 3, 4, 5, 9]])
plain = target.generate(prompt, max_new_tokens=30, do_sample=False)
repo = dict(custom_generate=sys.argv[1], trust_remote_code=True)
lookup = target.generate(prompt, max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=4, **repo)
drafted = target.generate(prompt, max_new_tokens=30, do_sample=False, assistant_model=draft, **repo)
oracle = target.generate(prompt, max_new_tokens=30, do_sample=False, assistant_model=target, **repo)
print(json.dumps({"lookup": torch.equal(lookup, plain), "draft": torch.equal(drafted, plain),
                  "oracle": torch.equal(oracle, plain), "hf_spec_imported": "hf_spec" in sys.modules}))
"""


def run_client(source: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", CLIENT, source], cwd="/", env={**env, "PYTHONPATH": ""},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_committed_repo_is_what_the_package_builds(tmp_path):
    built = custom_generate_repo.build(tmp_path / "repo")
    committed = REPO / "hub" / "custom_generate"
    names = sorted(str(path.relative_to(built)) for path in built.rglob("*") if path.is_file())
    assert names == sorted(str(path.relative_to(committed)) for path in committed.rglob("*")
                           if path.is_file() and "__pycache__" not in path.parts)
    stale = [name for name in names if not filecmp.cmp(built / name, committed / name, shallow=False)]
    assert not stale, f"hub/custom_generate is out of date ({stale}): run `hf-spec hub custom-generate`"
    assert "custom_generate/generate.py" in names and "custom_generate/engine_loop.py" in names
    assert "- custom_generate" in (built / "README.md").read_text()


def test_copied_modules_import_each_other_relatively_and_flat(tmp_path):
    built = custom_generate_repo.build(tmp_path / "repo") / "custom_generate"
    for path in built.glob("*.py"):
        text = path.read_text()
        assert "hf_spec." not in "\n".join(line for line in text.splitlines() if "import" in line), path.name
        assert "from .." not in text, path.name
    requirements = (built / "requirements.txt").read_text().split()
    assert "transformers>=5.20" in requirements and any(line.startswith("torch") for line in requirements)
    assert not any(line.startswith(("trl", "peft", "deepspeed", "pytest")) for line in requirements)


def test_transformers_alone_runs_the_folder_greedy_identical(tmp_path):
    folder = custom_generate_repo.build(tmp_path / "repo")
    result = run_client(str(folder), offline_env(tmp_path))
    assert result == {"lookup": True, "draft": True, "oracle": True, "hf_spec_imported": False}


def test_push_to_a_local_hub_and_generate_from_its_id(tmp_path):
    with LocalHub() as hub:
        env = hub_env(hub, tmp_path)
        pushed = run_python("""
import json
from hf_spec import custom_generate_repo
folder = custom_generate_repo.build("%s", repo_id="tester/hf-spec-generate")
print(json.dumps({"commit": custom_generate_repo.push(folder, "tester/hf-spec-generate")}))
""" % (tmp_path / "repo"), env)
        assert pushed["commit"]
        files = hub.repos["tester/hf-spec-generate"]
        assert "custom_generate/generate.py" in files and "README.md" in files
        assert not any("__pycache__" in name for name in files)
        result = run_client("tester/hf-spec-generate", env)
    assert result == {"lookup": True, "draft": True, "oracle": True, "hf_spec_imported": False}


def offline_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("arguments,match", [
    ({}, "exactly one of"),
    ({"prompt_lookup_num_tokens": 4, "assistant_model": object()}, "exactly one of"),
    ({"assistant_model": object()}, "transformers model"),
    ({"drafter": object()}, "propose/observe"),
])
def test_the_entry_point_says_which_drafter_argument_is_wrong(arguments, match):
    with pytest.raises(UnsupportedError, match=match):
        drafter_from_arguments(dict(arguments))
