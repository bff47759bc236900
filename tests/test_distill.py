"""Draft-model distillation with TRL's GKD trainer (hf_spec/training/distill.py, recipes/distill_draft.py).

The target is a tiny untied Llama with the byte-level test tokenizer whose second layer and LM head are scaled
up: its next tokens are peaked and decided by the layer a one-layer student lacks, so the student cut from its
first layer starts near zero acceptance and distillation has something to learn (about 0.5 after 40 steps).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from hf_spec.errors import UnsupportedError
from hf_spec.tiny_model import tiny_tokenizer
from hf_spec.training.distill import (
    acceptance_rate,
    distill,
    load_distill_config,
    prompt_row,
    save_student,
    student_from_target,
    tokens_per_step,
)
from tests.conftest import tiny_model
from tests.test_training_launch import free_port

pytest.importorskip("trl")
REPO = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "tree", "blue", "sky", "run", "fast", "red", "the", "a", "sun", "moon"]


def learnable_target(folder: Path, seed: int = 0) -> Path:
    """A 2-layer target whose second layer (x30) and LM head (x30) decide its peaked next tokens."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    target = LlamaForCausalLM(config)
    with torch.no_grad():
        target.lm_head.weight.mul_(30.0)
        target.model.layers[1].mlp.down_proj.weight.mul_(30.0)
        target.model.layers[1].self_attn.o_proj.weight.mul_(30.0)
    target.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)
    target.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts_file(path: Path, count: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(count)]
    path.write_text(json.dumps(prompts))
    return path


def tiny_overrides(tmp_path: Path, steps: int = 40) -> list[str]:
    return [f"model.name_or_path={learnable_target(tmp_path / 'target')}", "student.layers=1",
            f"prompts_file={prompts_file(tmp_path / 'prompts.json')}", "data.heldout_fraction=0.2",
            "gkd.lmbda=0.5", "gkd.seq_kd=true", "gkd.beta=0.0", "gkd.max_new_tokens=16",
            f"training.output_dir={tmp_path / 'student'}", f"training.max_steps={steps}",
            "training.micro_batch_size=8", "training.learning_rate=3e-3", "training.lr_scheduler=constant",
            "training.log_every_steps=1", "training.num_threads=1", "eval.heldout_prompts=16", "eval.max_new_tokens=24"]


# ---------------------------------------------------------------------------- the student
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tied", [True, False])
def test_student_from_target_copies_the_first_layers_and_round_trips(tmp_path, arch, tied):
    target = tiny_model(arch, dtype=torch.float32, num_hidden_layers=3, tie_word_embeddings=tied)
    student = student_from_target(target, 2)
    assert type(student) is type(target) and student.config.num_hidden_layers == 2
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    target_state = target.state_dict()
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, target_state[name]), name
        assert tensor.data_ptr() != target_state[name].data_ptr(), f"{name} is shared, not copied"
    assert not any(".layers.2." in name for name in student.state_dict())

    prompt = torch.randint(1, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student(prompt).logits
    save_student(student, tiny_tokenizer(), tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    assert (tmp_path / "student" / "model.safetensors").is_file() and type(loaded) is type(target)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, student.state_dict()[name]), name
    with torch.no_grad():  # the same weights and buffers; sums may differ in the last bit between forwards
        torch.testing.assert_close(loaded(prompt).logits, expected, rtol=0, atol=1e-6)


def test_student_from_target_refuses_a_layer_count_it_cannot_cut():
    target = tiny_model("llama", num_hidden_layers=2)
    for layers in (0, 2):
        with pytest.raises(UnsupportedError, match="keeps 1 to 1 of its layers"):
            student_from_target(target, layers)


def test_prompt_rows_mark_the_reply_and_config_errors_name_the_fix():
    tokenizer = tiny_tokenizer()
    plain = prompt_row(tokenizer, "hello")
    assert set(plain["completion_mask"]) == {0}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    row = prompt_row(tokenizer, {"messages": messages})
    assert tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]) == "yo<|im_end|>\n"
    with pytest.raises(ValueError, match="exactly one of student.name_or_path"):
        load_distill_config(None, ["model.name_or_path=x"])
    with pytest.raises(ValueError, match="Unknown key"):
        load_distill_config(None, ["model.name_or_path=x", "student.layers=1", "gkd.betta=0"])


def test_tokens_per_step_replays_greedy_chains():
    matches = [torch.tensor([True, True, False, True])]
    assert tokens_per_step(matches, 1) == pytest.approx(4 / 3)   # [T+bonus] [T+correction... ] replayed
    assert tokens_per_step(matches, 3) == pytest.approx(4 / 2)   # 2 accepted + correction, then 1 accepted


# ---------------------------------------------------------------------------- a distillation run
@pytest.fixture
def restore_threads():
    """distill() applies training.num_threads to this process; later tests get the conftest's count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gkd_distillation_lowers_the_loss_and_raises_acceptance(tmp_path, restore_threads):
    summary = distill(load_distill_config(None, tiny_overrides(tmp_path)))
    losses = summary["losses"]
    assert summary["steps"] == 40 and len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5
    before, after = summary["acceptance_before"], summary["acceptance_after"]
    assert after["acceptance_rate"] > before["acceptance_rate"] + 0.2, (before, after)
    assert after["tokens_per_step"]["3"] > before["tokens_per_step"]["3"]

    # The exported student is a plain causal LM: reload it and measure again, independently of the run.
    folder = tmp_path / "student"
    card = (folder / "README.md").read_text()
    assert "draft-model" in card and "distillation" in card and "beta: 0.0" in card and "| after distillation |" in card
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "target").eval()
    student = AutoModelForCausalLM.from_pretrained(folder).eval()
    initial = student_from_target(target, 1)
    tokenizer = tiny_tokenizer()
    heldout = [prompt_row(tokenizer, f"{word} sky the red")["input_ids"] for word in WORDS[:8]]
    assert acceptance_rate(target, student, heldout, 24) > acceptance_rate(target, initial, heldout, 24) + 0.2
    assert acceptance_rate(target, target, heldout, 24) == 1.0


def test_plain_prompts_need_on_policy_or_teacher_samples(tmp_path):
    overrides = tiny_overrides(tmp_path, steps=1) + ["gkd.seq_kd=false", "gkd.lmbda=0.5"]
    with pytest.raises(UnsupportedError, match="gkd.lmbda: 1"):
        distill(load_distill_config(None, overrides))


# ---------------------------------------------------------------------------- accelerate launch
@pytest.mark.parametrize("mode,zero_stage", [("ddp", 0), ("zero2", 2), ("zero3", 3)])
def test_recipe_under_two_process_launches(tmp_path, mode, zero_stage):
    """recipes/distill_draft.py with 2 CPU processes (DDP over gloo, DeepSpeed ZeRO-2 and ZeRO-3 on the CPU
    accelerator): trains, and the main process exports the student."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    if mode == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    command = [accelerate, "launch", "--config_file", f"configs/accelerate/{mode}.yaml",
               "--main_process_port", str(free_port()), "recipes/distill_draft.py",
               "--config", "configs/distill/smollm2-135m-instruct.yaml"]
    for override in tiny_overrides(tmp_path, steps=6) + ["training.num_threads=1", "eval.heldout_prompts=4"]:
        command += ["--set", override]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "student" / "distill.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    assert summary.get("zero_stage", 0) == zero_stage
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student").config.num_hidden_layers == 1


# ---------------------------------------------------------------------------- publishing
def test_a_distilled_student_pushes_and_loads_by_id_as_a_drafter(tmp_path):
    """save_student's folder (card, tokenizer, weights) through a local Hub, back as
    DraftModelDrafter.from_pretrained("<id>"), and greedy decoding with it identical to plain generate()."""
    from tests.test_hub_medusa import LocalHub, hub_env, run_python

    target_folder = learnable_target(tmp_path / "target")
    target = AutoModelForCausalLM.from_pretrained(target_folder)
    save_student(student_from_target(target, 1), tiny_tokenizer(), tmp_path / "student", "---\ntags: [x]\n---\n")
    with LocalHub() as hub:
        result = run_python(f"""
import json, torch, hf_spec
from transformers import AutoModelForCausalLM
from hf_spec.training.hub import push_folder_to_hub
push_folder_to_hub("{tmp_path / 'student'}", "tester/tiny-draft")
drafter = hf_spec.DraftModelDrafter.from_pretrained("tester/tiny-draft", num_tokens=3)
target = AutoModelForCausalLM.from_pretrained("{target_folder}").eval()
prompt = torch.tensor([[5, 9, 12, 7, 5, 9]])
plain = target.generate(prompt, max_new_tokens=20, do_sample=False)
got = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=drafter)
print(json.dumps({{"same": torch.equal(plain, got), "layers": drafter.draft_model.config.num_hidden_layers}}))
""", hub_env(hub, tmp_path))
        files = hub.repos["tester/tiny-draft"]
    assert result == {"same": True, "layers": 1}
    assert "model.safetensors" in files and "README.md" in files and "tokenizer.json" in files
