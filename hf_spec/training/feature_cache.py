"""Cache the frozen target's hidden states of selected layers, streamed to disk in safetensors shards.

Feature-level draft heads read the target's hidden states: Medusa the last one after the final norm, Clover-2
and Falcon the last one before it, EAGLE-3 a low, a middle and a high layer (Li et al. 2025: the inputs of
layers 2, n//2 and n-3). When the target is frozen, running it once over the training data and storing these
features turns every epoch into a head-only computation.

Layer names are those of ``hf_spec.engine.features`` (the same capture the engine uses at inference, so a
head trains on exactly the features it will be given): transformers' ``output_hidden_states`` indices taken
*before* the final norm (``0`` the embedding output, ``num_layers`` the last layer's output, negative
indices from the end) and ``"final"``, the last hidden state *after* the final norm (what the lm_head reads).

On disk (``shards.py``): shards of consecutive examples, each at most ``shard_tokens`` tokens (one longer
example gets a shard alone), in ``float16`` / ``bfloat16`` / ``float32``; a manifest lists the finished
shards, so an interrupted run resumes after the last one, and token data that has grown since (more
conversations) gets the missing examples appended. Each feature shard records a digest of the token ids it
was computed from: shards whose examples changed since (a partial last chunk of self-distilled data is
regenerated when a larger build extends it) are recomputed. Examples keep the order of the token data.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..engine.features import FINAL, capture_features, decoder_parts, resolve_layers
from .shards import ShardReader, ShardWriter, flatten_examples


def feature_key(layer) -> str:
    """The name of a cached feature in shards and training batches: ``hidden`` for the post-norm last hidden
    state (what Medusa heads read), ``hidden_<i>`` for pre-norm layer outputs."""
    return "hidden" if layer == FINAL else f"hidden_{layer}"


@torch.no_grad()
def compute_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: tuple) -> dict[str, torch.Tensor]:
    """``{feature_key(layer): (batch, length, hidden)}`` of the target's decoder for resolved ``layers``
    (the decoder alone runs: no lm_head)."""
    decoder, _, _ = decoder_parts(model)
    with capture_features(model, layers) as store:
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        fused = store.features()
    return dict(zip((feature_key(layer) for layer in layers), fused.chunk(len(layers), dim=-1)))


def _batches_by_tokens(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that (rows x longest row) stays within ``batch_tokens``; similar lengths together."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    batches, current = [], []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def features_for_examples(model, examples: list[torch.Tensor], layers: list, batch_tokens: int,
                          dtype: torch.dtype, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per example, ``{feature_key: (length, hidden)}`` on the CPU in ``dtype`` (right padding, batched)."""
    results: list[dict | None] = [None] * len(examples)
    lengths = [len(ids) for ids in examples]
    for batch in _batches_by_tokens(lengths, batch_tokens):
        width = max(lengths[index] for index in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, index in enumerate(batch):
            input_ids[row, : lengths[index]] = examples[index]
            attention_mask[row, : lengths[index]] = 1
        features = compute_features(model, input_ids.to(model.device), attention_mask.to(model.device), layers)
        for row, index in enumerate(batch):
            results[index] = {name: value[row, : lengths[index]].to("cpu", dtype) for name, value in features.items()}
    return results


def _shard_groups(lengths: list[int], start: int, shard_tokens: int):
    """Consecutive example ranges ``[first, last)`` from ``start`` holding at most ``shard_tokens`` tokens each."""
    first, total = start, 0
    for index in range(start, len(lengths)):
        if index > first and total + lengths[index] > shard_tokens:
            yield first, index
            first, total = index, 0
        total += lengths[index]
    if first < len(lengths):
        yield first, len(lengths)


def cache_features(model, tokens: ShardReader, folder: str | Path, layers: list, *, identity: dict,
                   dtype: str = "float16", shard_tokens: int = 32768, batch_tokens: int = 4096,
                   log: Callable[[str], None] = print) -> ShardReader:
    """Cache ``layers`` of ``model`` for every example of ``tokens`` into ``folder`` (resumes a partial run)."""
    resolved = resolve_layers(model, layers)
    writer = ShardWriter(folder, {**identity, "layers": [str(layer) for layer in resolved], "dtype": dtype,
                                  "shard_tokens": shard_tokens}, prefix="features")
    stale = _first_stale_shard(writer.shards, tokens)
    if stale < len(writer.shards):
        log(f"[features] the token data changed from example {writer.shards[stale]['examples'][0]} on (a partial "
            f"chunk regenerated): recomputing {len(writer.shards) - stale} feature shards")
        writer.truncate(stale)
    start = writer.shards[-1]["examples"][1] if writer.shards else 0
    if start < len(tokens):  # new, interrupted, or the token data has grown since
        lengths = [int(tokens.read(index, ["input_ids"])["input_ids"].shape[0]) for index in range(len(tokens))]
        if start:
            log(f"[features] resuming after {len(writer.shards)} shards ({start} of {len(lengths)} examples)")
        writer.reopen()
        storage = getattr(torch, dtype)
        names = [feature_key(layer) for layer in resolved]
        for first, last in _shard_groups(lengths, start, shard_tokens):
            began = time.perf_counter()
            examples = [tokens.read(index, ["input_ids"])["input_ids"].long() for index in range(first, last)]
            features = features_for_examples(model, examples, resolved, batch_tokens, storage)
            seconds = time.perf_counter() - began
            count = sum(lengths[first:last])
            writer.write(flatten_examples(features, names), {"layers": names},
                         {"examples": [first, last], "tokens": count, "seconds": round(seconds, 3),
                          "token_digest": _token_digest(examples)})
            done = sum(shard["tokens"] for shard in writer.shards)
            log(f"[features] shard {len(writer.shards)}: examples {first}-{last}, {count} tokens in {seconds:.1f} s "
                f"({count / max(seconds, 1e-9):.0f} tokens/s); {done}/{sum(lengths)} tokens cached")
    if not writer.complete:
        writer.finish(_summary(writer, folder))
    return ShardReader(folder)


def _token_digest(examples: list[torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) of the token ids of a run of examples: what a feature shard was computed from."""
    digest = hashlib.sha256()
    for ids in examples:
        digest.update(ids.to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def _first_stale_shard(shards: list[dict], tokens: ShardReader) -> int:
    """Index of the first feature shard whose examples no longer hold the token ids it was computed from (the
    token data regrows its last partial chunk when more conversations are requested); ``len(shards)`` if none."""
    for index, shard in enumerate(shards):
        first, last = shard["examples"]
        if last > len(tokens) or "token_digest" not in shard:
            return index
        examples = [tokens.read(example, ["input_ids"])["input_ids"] for example in range(first, last)]
        if _token_digest(examples) != shard["token_digest"]:
            return index
    return len(shards)


def _summary(writer: ShardWriter, folder) -> dict:
    tokens = sum(shard["tokens"] for shard in writer.shards)
    seconds = sum(shard["seconds"] for shard in writer.shards)
    size = sum((Path(folder) / shard["file"]).stat().st_size for shard in writer.shards)
    return {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "bytes": size, "bytes_per_million_tokens": round(size / max(tokens, 1) * 1e6)}
