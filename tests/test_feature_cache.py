"""The sharded feature cache: the right layers, bounded shards, resumable, fingerprinted, read back for training."""

from __future__ import annotations

import pytest
import torch

from hf_spec.errors import UnsupportedError
from hf_spec.training import feature_cache as cache_module
from hf_spec.training.data import PaddingCollator
from hf_spec.training.data_config import DataSection
from hf_spec.training.feature_cache import cache_features, compute_features
from hf_spec.training.models import load_target
from hf_spec.training.prepare_data import (
    load_prepared_data,
    model_identity,
    prepare_data,
)
from hf_spec.training.shards import ShardReader, ShardWriter, flatten_examples
from tests.helpers import sharegpt_file


@pytest.fixture(scope="module")
def tiny():
    return load_target("hf_spec:tiny-random-llama")


def token_store(folder, lengths: list[int], vocab: int = 200) -> ShardReader:
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, vocab, (n,), generator=generator, dtype=torch.int32),
             "loss_mask": torch.ones(n, dtype=torch.uint8)} for n in lengths]
    writer = ShardWriter(folder, {"test": 1}, prefix="tokens")
    writer.write(flatten_examples(rows, ["input_ids", "loss_mask"]), {"ids": [str(i) for i in range(len(rows))]}, {})
    writer.finish({})
    return ShardReader(folder)


def test_features_are_the_targets_hidden_states_before_and_after_the_norm(tiny):
    model, _ = tiny
    ids = torch.randint(3, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding must not change the kept positions
    features = compute_features(model, ids, mask, (0, 1, 2, "final"))
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        final = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(features["hidden_0"], reference[0])
    torch.testing.assert_close(features["hidden_1"], reference[1])
    torch.testing.assert_close(features["hidden"], final)
    torch.testing.assert_close(model.get_decoder().norm(features["hidden_2"]), final)  # layer 2 of 2: pre-norm
    alone = compute_features(model, ids[1:, :6], mask[1:, :6], (1,))
    torch.testing.assert_close(alone["hidden_1"][0], features["hidden_1"][1, :6], atol=1e-5, rtol=1e-5)


def test_cache_is_sharded_by_tokens_in_the_storage_dtype_and_read_back(tiny, tmp_path):
    model, _ = tiny
    lengths = [30, 50, 20, 90, 10, 40]
    tokens = token_store(tmp_path / "tokens", lengths)
    features = cache_features(model, tokens, tmp_path / "features", [-1, "final"], identity={"t": 1},
                              dtype="bfloat16", shard_tokens=100, batch_tokens=64, log=lambda line: None)
    shards = features.manifest["shards"]
    assert [shard["examples"] for shard in shards] == [[0, 3], [3, 5], [5, 6]]  # consecutive, <= 100 tokens each
    assert len(features) == len(lengths)
    row = features.read(3, ["hidden_2", "hidden"])
    assert row["hidden"].dtype == torch.bfloat16 and row["hidden"].shape == (90, 32)
    ids = tokens.read(3, ["input_ids"])["input_ids"].long()[None]
    live = compute_features(model, ids, torch.ones_like(ids), (2, "final"))
    torch.testing.assert_close(row["hidden"].float(), live["hidden"][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(row["hidden_2"].float(), live["hidden_2"][0], atol=2e-2, rtol=2e-2)
    summary = features.manifest["summary"]
    assert summary["tokens"] == sum(lengths) and summary["bytes_per_million_tokens"] > 2 * 2 * 32 * 1e6


def test_an_interrupted_cache_resumes_and_matches_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    tokens = token_store(tmp_path / "tokens", [30, 50, 20, 90, 10, 40])
    settings = dict(identity={"t": 1}, dtype="float16", shard_tokens=60, batch_tokens=64, log=lambda line: None)
    original = cache_module.features_for_examples
    calls = []

    def killed_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "features_for_examples", killed_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_features(model, tokens, tmp_path / "resumed", [1, "final"], **settings)
    assert len(ShardReader(tmp_path / "resumed", allow_incomplete=True).manifest["shards"]) == 2
    calls.clear()
    monkeypatch.setattr(cache_module, "features_for_examples", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = cache_features(model, tokens, tmp_path / "resumed", [1, "final"], **settings)
    assert len(calls) == len(resumed.manifest["shards"]) - 2  # the first two shards were not recomputed
    monkeypatch.setattr(cache_module, "features_for_examples", original)
    fresh = cache_features(model, tokens, tmp_path / "fresh", [1, "final"], **settings)
    for index in range(len(tokens)):
        for name, value in fresh.read(index, ["hidden_1", "hidden"]).items():
            assert torch.equal(resumed.read(index, [name])[name], value)


def test_the_fingerprint_covers_target_layers_and_settings(tiny, tmp_path):
    model, tokenizer = tiny
    config = DataSection(source=sharegpt_file(tmp_path, 4), num_conversations=4, max_length=96, heldout_fraction=0.5,
                         feature_layers=[1, "final"], cache_dir=str(tmp_path / "cache"))
    first = prepare_data(config, tokenizer, model, progress=False, log=lambda line: None)
    again = prepare_data(config, tokenizer, model, progress=False, log=lambda line: None)
    assert again.features_dir == first.features_dir
    before = model_identity(model)
    weight = model.model.layers[0].mlp.up_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0
    try:
        assert model_identity(model) != before
        changed = prepare_data(config, tokenizer, model, progress=False, log=lambda line: None)
        assert changed.features_dir != first.features_dir and changed.tokens_dir == first.tokens_dir
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    other_layers = DataSection(**{**config.__dict__, "feature_layers": [0, "final"]})
    assert load_prepared_data(config, tokenizer, model).features_dir == first.features_dir
    with pytest.raises(Exception, match="not built yet"):
        load_prepared_data(other_layers, tokenizer, model)
    with pytest.raises(UnsupportedError, match="same layer twice"):
        prepare_data(DataSection(**{**config.__dict__, "feature_layers": [2, -1]}), tokenizer, model)
    assert first.dataset("train")[0].keys() == {"input_ids", "loss_mask"}  # features only when asked for
    with pytest.raises(ValueError, match="not cached"):
        first.dataset("train", features=[2])
    train = first.dataset("train", features=config.feature_layers)
    batch = PaddingCollator(0)([train[i] for i in range(len(train))])
    assert batch["hidden"].shape[:2] == batch["input_ids"].shape and batch["hidden_1"].dtype == torch.float32
    assert not batch["hidden"][~batch["attention_mask"].bool()].any()


def test_feature_shards_whose_token_data_changed_are_recomputed(tiny, tmp_path, monkeypatch):
    """A larger self-distilled build regenerates its last partial chunk: the features of those examples must follow."""
    model, _ = tiny
    settings = dict(identity={"t": 1}, dtype="float32", shard_tokens=60, batch_tokens=64, log=lambda line: None)
    lengths = [30, 50, 20, 90, 10, 40]
    tokens = token_store(tmp_path / "tokens", lengths)
    before = cache_features(model, tokens, tmp_path / "features", ["final"], **settings)
    kept_shards = [shard for shard in before.manifest["shards"] if shard["examples"][1] <= 3]
    assert 0 < len(kept_shards) < len(before.manifest["shards"])

    generator = torch.Generator().manual_seed(7)
    rows = [tokens.read(index, ["input_ids"])["input_ids"] for index in range(3)]
    rows += [torch.randint(3, 200, (n,), generator=generator, dtype=torch.int32) for n in lengths[3:]]
    writer = ShardWriter(tmp_path / "regrown", {"test": 1}, prefix="tokens")
    writer.write(flatten_examples([{"input_ids": ids, "loss_mask": torch.ones(len(ids), dtype=torch.uint8)}
                                   for ids in rows], ["input_ids", "loss_mask"]), {"ids": list("abcdef")}, {})
    writer.finish({})
    del writer
    calls = []
    original = cache_module.features_for_examples
    monkeypatch.setattr(cache_module, "features_for_examples", lambda *a, **k: calls.append(1) or original(*a, **k))
    after = cache_features(model, ShardReader(tmp_path / "regrown"), tmp_path / "features", ["final"], **settings)
    assert len(calls) == len(after.manifest["shards"]) - len(kept_shards)
    for index, ids in enumerate(rows):
        live = compute_features(model, ids.long()[None], torch.ones(1, len(ids), dtype=torch.long), ("final",))
        torch.testing.assert_close(after.read(index, ["hidden"])["hidden"], live["hidden"][0], atol=1e-5, rtol=1e-5)


def test_a_shard_folder_is_written_by_one_process_at_a_time(tmp_path):
    from hf_spec.training.shards import ShardStoreError

    first = ShardWriter(tmp_path / "data", {"test": 1}, prefix="tokens")
    with pytest.raises(ShardStoreError, match="being written by another process"):
        ShardWriter(tmp_path / "data", {"test": 1}, prefix="tokens")
    del first
    ShardWriter(tmp_path / "data", {"test": 1}, prefix="tokens")  # released with the first writer
