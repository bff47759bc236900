"""Batched self-distillation and the prepare-data step: token ids kept as generated, cut replies, resumable
shards, prefix reuse, and training processes that only read."""

from __future__ import annotations

import json

import pytest
import torch

from hf_spec.training import prepare_data as prepare_module
from hf_spec.training.data_config import DataSection
from hf_spec.training.models import load_target
from hf_spec.training.prepare_data import (
    DataNotPreparedError,
    load_prepared_data,
    prepare_data,
)
from hf_spec.training.self_distill import (
    DistillSettings,
    distill_conversations,
    generate_replies,
    stop_token_ids,
)
from tests.helpers import conversations, reply_spans, sharegpt_file, stopping_target

BRIDGE = "\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def stopping():
    return stopping_target()


def test_batched_left_padded_replies_equal_one_prompt_at_a_time():
    model, tokenizer = load_target("hf_spec:tiny-random-llama")
    model = model.double()  # no near-tie can flip an argmax between batched and single-row matmuls
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("Hi", "A much longer prompt.", "Mid")]
    budgets = [10, 4, 10]
    stops = stop_token_ids(model, tokenizer)
    replies, endings, computed = generate_replies(model, prompts, budgets, 0.0, stops, tokenizer.pad_token_id,
                                                  DistillSettings())
    for prompt, budget, reply in zip(prompts, budgets, replies):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert reply == alone[: len(reply)] and (len(reply) == budget or reply[-1] in stops)
    assert endings == ["stop" if reply[-1] in stops else "cut" for reply in replies]
    assert computed == 3 * 10


def test_degenerate_loops_stop_early_and_count_as_cut():
    model, tokenizer = load_target("hf_spec:tiny-random-llama")  # greedy, it repeats a short cycle forever
    prompt = tokenizer("Loop", add_special_tokens=False)["input_ids"]
    settings = DistillSettings(loop_window=24, loop_min_distinct=12)
    stops = stop_token_ids(model, tokenizer)
    replies, endings, computed = generate_replies(model, [prompt], [200], 0.0, stops, tokenizer.pad_token_id, settings)
    assert endings == ["loop"] and 24 <= len(replies[0]) < 200 and computed == len(replies[0])
    assert len(set(replies[0][-24:])) < 12
    unchecked = DistillSettings(loop_window=0)
    _, endings, computed = generate_replies(model, [prompt], [60], 0.0, stops, tokenizer.pad_token_id, unchecked)
    assert endings == ["cut"] and computed == 60
    conversation = [("c0", [{"role": "user", "content": "Loop"}, {"role": "assistant", "content": "-"}])]
    keep = DistillSettings(max_new_tokens=200, loop_window=24, loop_min_distinct=12, cut_replies="keep")
    examples, stats = distill_conversations(model, tokenizer, conversation, keep)
    assert stats.looping_replies == 1 and examples == []  # "keep" keeps replies cut by the cap, never loops


def test_multi_turn_replies_are_stored_as_generated_ids(stopping):
    model, tokenizer = stopping
    settings = DistillSettings(max_length=200, max_new_tokens=24, temperatures=(1.0,), batch_size=6)
    examples, stats = distill_conversations(model, tokenizer, conversations(6), settings)
    assert stats.replies > 6 and stats.assistant_tokens == sum(sum(e["loss_mask"]) for e in examples)
    eos = tokenizer.eos_token_id
    two_turns = 0
    for example in examples:
        ids, mask = example["input_ids"], example["loss_mask"]
        spans = reply_spans(mask)
        first_prompt = tokenizer.apply_chat_template(conversations(6)[int(example["id"][1:])][1][:1],
                                                     add_generation_prompt=True, tokenize=False)
        assert ids[: spans[0][0]] == tokenizer(first_prompt, add_special_tokens=False)["input_ids"]
        assert all(ids[end - 1] == eos for _, end in spans)  # every kept reply ends on the end-of-turn token
        if len(spans) == 2:
            two_turns += 1
            assert tokenizer.decode(ids[spans[0][1]: spans[1][0]]) == BRIDGE  # template text only, nothing re-tokenized
            assert spans[1][1] == len(ids)
    assert two_turns >= 2


def test_sampled_replies_are_reproducible(stopping):
    model, tokenizer = stopping
    sampled = DistillSettings(max_length=200, max_new_tokens=16, temperatures=(1.0,), batch_size=5, seed=3)
    first, _ = distill_conversations(model, tokenizer, conversations(5, turns=1), sampled)
    again, _ = distill_conversations(model, tokenizer, conversations(5, turns=1), sampled)
    assert first == again
    assert len({tuple(e["input_ids"]) for e in first}) == len(first)
    other_seed, _ = distill_conversations(model, tokenizer, conversations(5, turns=1),
                                          DistillSettings(**{**sampled.__dict__, "seed": 4}))
    assert other_seed != first


@pytest.mark.parametrize("policy", ["drop", "mask", "keep"])
def test_replies_cut_by_the_length_cap_are_dropped_masked_or_kept(stopping, policy):
    model, tokenizer = stopping
    settings = DistillSettings(max_length=200, max_new_tokens=6, temperatures=(1.0,), batch_size=8, cut_replies=policy)
    examples, stats = distill_conversations(model, tokenizer, conversations(8), settings)
    assert stats.cut_replies > 0 and stats.replies > 0
    eos = tokenizer.eos_token_id
    cut_tails = 0
    for example in examples:
        ids, mask = example["input_ids"], example["loss_mask"]
        spans = reply_spans(mask)
        ended = [ids[end - 1] == eos for _, end in spans]
        if policy == "keep" and not ended[-1]:
            cut_tails += 1  # the cut reply keeps its loss: 6 generated tokens, no end-of-turn, nothing after it
            assert spans[-1][1] == len(ids) and spans[-1][1] - spans[-1][0] == 6 and eos not in ids[-6:]
            ended = ended[:-1]
        assert all(ended)
        last_reply_end = spans[-1][1]
        if policy == "drop":
            assert last_reply_end == len(ids)
        elif policy == "mask" and last_reply_end < len(ids):
            cut_tails += 1  # the cut reply is context with no loss: up to 6 generated tokens, no end-of-turn
            assert eos not in ids[-6:] and not any(mask[last_reply_end:])
    assert (policy == "drop") == (cut_tails == 0)
    if policy == "keep":
        assert stats.assistant_tokens == sum(sum(example["loss_mask"]) for example in examples)


def test_a_turn_without_room_under_max_length_is_not_generated(stopping):
    model, tokenizer = stopping
    short = DistillSettings(max_length=60, max_new_tokens=40, temperatures=(1.0,), min_new_tokens=16)
    examples, _ = distill_conversations(model, tokenizer, conversations(6), short)
    assert all(len(example["input_ids"]) <= 60 for example in examples)
    assert all(len(reply_spans(example["loss_mask"])) == 1 for example in examples)


def test_a_turn_with_a_prompt_over_max_prompt_tokens_is_not_generated(stopping):
    model, tokenizer = stopping
    settings = DistillSettings(max_length=200, max_new_tokens=8, temperatures=(0.0,), batch_size=8)
    both_turns, _ = distill_conversations(model, tokenizer, conversations(6), settings)
    assert all(len(reply_spans(example["loss_mask"])) == 2 for example in both_turns)
    first_prompt = max(reply_spans(example["loss_mask"])[0][0] for example in both_turns)
    bounded = DistillSettings(**{**settings.__dict__, "max_prompt_tokens": first_prompt})
    first_only, _ = distill_conversations(model, tokenizer, conversations(6), bounded)
    assert len(first_only) == len(both_turns)
    assert all(len(reply_spans(example["loss_mask"])) == 1 for example in first_only)


# ---------------------------------------------------------------------------------------------- prepare-data
def distill_config(tmp_path, **overrides) -> DataSection:
    settings = dict(source=sharegpt_file(tmp_path, 6), num_conversations=6, max_length=160, heldout_fraction=0.3,
                    max_turns=1, self_distillation=True, self_distillation_temperatures=[0.0, 1.0],
                    self_distillation_max_new_tokens=8, self_distillation_batch_size=4,
                    self_distillation_chunk_conversations=2, self_distillation_cut_replies="mask",
                    cache_dir=str(tmp_path / "cache"))
    return DataSection(**{**settings, **overrides})


def token_rows(prepared) -> list[tuple]:
    reader = prepared.tokens()
    return [(reader.metadata(i, "ids"), tuple(reader.read(i, ["input_ids"])["input_ids"].tolist()),
             tuple(reader.read(i, ["loss_mask"])["loss_mask"].tolist())) for i in prepared.example_indices()]


def test_an_interrupted_build_resumes_after_its_last_complete_shard(stopping, tmp_path, monkeypatch):
    model, tokenizer = stopping
    config = distill_config(tmp_path)
    original = prepare_module.distill_conversations
    calls = []

    def failing_second_chunk(*args, **kwargs):
        calls.append(kwargs["seed_offset"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "distill_conversations", failing_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(config, tokenizer, model, progress=False, log=lambda line: None)
    with pytest.raises(DataNotPreparedError, match="hf-spec prepare-data"):
        load_prepared_data(config, tokenizer, model)
    calls.clear()
    monkeypatch.setattr(prepare_module, "distill_conversations", lambda *a, **k: calls.append(k["seed_offset"]) or original(*a, **k))
    resumed = prepare_data(config, tokenizer, model, progress=False, log=lambda line: None)
    assert calls == [1, 2]  # chunk 0 was kept, not regenerated
    fresh = prepare_data(distill_config(tmp_path, cache_dir=str(tmp_path / "fresh")), tokenizer, model,
                         progress=False, log=lambda line: None)
    assert token_rows(resumed) == token_rows(fresh)
    calls.clear()
    assert token_rows(load_prepared_data(config, tokenizer, model)) == token_rows(resumed) and calls == []


def test_fewer_conversations_read_a_prefix_and_more_append(tmp_path):
    _, tokenizer = load_target("hf_spec:tiny-random-llama")
    small = DataSection(source=sharegpt_file(tmp_path, 10), num_conversations=3, max_length=160,
                        cache_dir=str(tmp_path / "cache"))
    prepared_small = prepare_data(small, tokenizer, progress=False, log=lambda line: None)
    large = DataSection(**{**small.__dict__, "num_conversations": 10})
    prepared_large = prepare_data(large, tokenizer, progress=False, log=lambda line: None)
    assert prepared_small.tokens_dir == prepared_large.tokens_dir
    assert [row[0] for row in token_rows(prepared_large)] == [f"c{i}" for i in range(10)]
    again_small = load_prepared_data(small, tokenizer)
    assert token_rows(again_small) == token_rows(prepared_large)[:3]
    with pytest.raises(DataNotPreparedError):
        load_prepared_data(DataSection(**{**small.__dict__, "max_length": 100}), tokenizer)


def test_cli_prepares_data_from_a_recipe_config(tmp_path, capsys):
    from hf_spec.cli import main

    source = sharegpt_file(tmp_path, 6)
    assert main(["prepare-data", "--config", "configs/medusa/tiny-random.yaml", "--set", f"data.source={source}",
                 "--set", "data.num_conversations=6", "--set", f"data.cache_dir={tmp_path}/cache",
                 "--set", "data.feature_layers=[1, final]", "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    info = json.loads(printed[printed.index("\n{") + 1:])
    assert info["train"]["examples"] + info["heldout"]["examples"] == 6
    assert info["features_build"]["tokens"] == info["tokens_build"]["tokens"]
    model, tokenizer = load_target("hf_spec:tiny-random-llama")
    config = DataSection(source=source, num_conversations=6, max_length=192, heldout_fraction=0.2, labels="hard",
                         feature_layers=[1, "final"], cache_dir=f"{tmp_path}/cache")
    prepared = load_prepared_data(config, tokenizer, model)
    layers = config.feature_layers
    rows = [prepared.dataset("train", layers)[i] for i in range(len(prepared.dataset("train")))]
    rows += [prepared.dataset("heldout", layers)[i] for i in range(len(prepared.dataset("heldout")))]
    assert len(rows) == 6 and set(rows[0]) == {"input_ids", "loss_mask", "hidden_1", "hidden"}
    with pytest.raises(Exception, match="Unknown key"):
        main(["prepare-data", "--config", "configs/medusa/tiny-random.yaml", "--set", "data.feature_layer=[1]"])
