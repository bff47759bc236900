"""``prepare-data``: build a recipe's training data once, on disk, before any training process starts.

    hf-spec prepare-data --config configs/medusa/smollm2-135m.yaml [--set data.key=value ...] [--threads 1]
    python -m hf_spec.training.prepare_data --config ...          (the same)

Two stages, each a folder of safetensors shards under ``data.cache_dir`` named by a fingerprint of everything
that shapes its content, each resumable (a killed run continues after its last complete shard):

1. ``tokens-<fingerprint>/``: every usable conversation as token ids and a loss mask (1 on assistant tokens),
   either the data's own replies rendered with the target's chat template (``chat_tokens.py``) or the
   target's regenerated replies (``self_distill.py``, batched, ``data.self_distillation_chunk_conversations``
   conversations per shard). Fingerprint: data settings, the source file's content, the tokenizer and, for
   self-distillation, the target.
2. ``features-<fingerprint>/`` (when ``data.feature_layers`` or ``data.cache_hidden_states`` is set): the
   frozen target's hidden states of those layers for every example (``feature_cache.py``). Fingerprint: the
   token data's fingerprint, the target, the layers, the storage dtype and the shard size.

Training processes then only read (``load_prepared_data``): no rank waits in a collective while another builds
data. The split into ``train`` / ``heldout`` is made when reading, by a hash of each conversation id.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.features import resolve_layers
from ..wheels import file_sha256
from .chat_tokens import tokenize_conversation
from .data_config import DataSection, as_data_section, data_section_problems
from .feature_cache import cache_features, feature_key
from .shards import ShardReader, ShardWriter, flatten_examples, read_manifest
from .self_distill import DistillSettings, DistillStats, distill_conversations

PREPARED_FORMAT_VERSION = 1
TOKENIZE_CHUNK = 2048  # conversations per token shard without self-distillation


class DataNotPreparedError(RuntimeError):
    """Training asked for data that ``prepare-data`` has not built (or not finished)."""


# ---------------------------------------------------------------------------------------------- identities
def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_digest(source: str) -> str:
    """SHA-256 of the conversation file (the packaged ShareGPT file for ``"sharegpt"``)."""
    from .sharegpt import sharegpt_path

    return file_sha256(sharegpt_path() if source == "sharegpt" else Path(source))


def tokenizer_identity(tokenizer) -> dict:
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"class": type(tokenizer).__name__, "size": len(tokenizer),
            "vocab": hashlib.sha256(vocabulary.encode()).hexdigest()[:16],
            "chat_template": hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]}


@torch.no_grad()
def model_identity(model) -> dict:
    """The target's class, configuration and a digest of its weights (shape, dtype and the first and last 4096
    values of every parameter: cheap on large models, different for any two trained checkpoints)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        flat = parameter.detach().reshape(-1)
        sample = torch.cat([flat[:4096], flat[-4096:]]).float().cpu()
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"):
        config.pop(volatile, None)
    return {"class": type(model).__name__, "config": _digest(config), "weights": digest.hexdigest()[:16]}


def token_identity(config: DataSection, tokenizer, target_id: dict | None) -> dict:
    """Everything that shapes the token data: not the split, labels or feature settings, and not
    ``num_conversations`` (the data of fewer conversations is a prefix of the data of more)."""
    settings = {name: getattr(config, name) for name in ("source", "max_length", "max_turns")}
    if config.self_distillation:
        settings["distill"] = dataclasses.asdict(DistillSettings.from_data_section(config))
        settings["chunk"] = config.self_distillation_chunk_conversations
    return {"version": PREPARED_FORMAT_VERSION, "stage": "tokens", "data": settings,
            "source": source_digest(config.source), "tokenizer": tokenizer_identity(tokenizer),
            "target": target_id if config.self_distillation else None}


def needs_target(config: DataSection) -> bool:
    return bool(config.self_distillation or config.cached_features())


# ---------------------------------------------------------------------------------------------- result
@dataclass
class PreparedData:
    """The built data of one recipe: token shards, optional feature shards, and the split settings."""

    config: DataSection
    tokens_dir: Path
    features_dir: Path | None

    def tokens(self) -> ShardReader:
        # A folder may hold more conversations than this config reads (a larger build); see split_indices.
        return ShardReader(self.tokens_dir, allow_incomplete=True)

    def features(self) -> ShardReader | None:
        return ShardReader(self.features_dir, allow_incomplete=True) if self.features_dir else None

    def example_indices(self) -> list[int]:
        """Examples of the first ``num_conversations`` conversations (the folder may hold more)."""
        limit = self.config.num_conversations
        positions = self.tokens().column("conversation_index")
        return [index for index, position in enumerate(positions) if limit is None or position < limit]

    def split_indices(self, split: str) -> list[int]:
        from .data import SPLITS, is_heldout

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        ids = self.tokens().column("ids")
        return [index for index in self.example_indices()
                if is_heldout(ids[index], self.config.seed, self.config.heldout_fraction) == (split == "heldout")]

    def dataset(self, split: str, features: list | tuple = ()) -> "PreparedDataset":
        """The examples of ``split`` as a torch ``Dataset`` of ``input_ids``, ``loss_mask`` and the cached
        ``features`` asked for (layer names of ``data.feature_layers``; none by default)."""
        missing = [layer for layer in features if str(layer) not in map(str, self.config.cached_features())]
        if missing:
            raise ValueError(f"Features {missing} are not cached by this data (data.feature_layers: "
                             f"{self.config.cached_features()}); add them to data.feature_layers and run prepare-data.")
        reader = self.features() if features else None
        return PreparedDataset(self.tokens(), reader, self.split_indices(split), [feature_key(layer) for layer in features])

    def info(self) -> dict:
        """Counts per split, and the build summaries (throughput, disk) of each stage."""
        tokens = self.tokens()
        info = {}
        for split in ("train", "heldout"):
            masks = [tokens.read(index, ["loss_mask"])["loss_mask"] for index in self.split_indices(split)]
            info[split] = {"examples": len(masks), "tokens": sum(int(mask.shape[0]) for mask in masks),
                           "assistant_tokens": sum(int(mask.sum()) for mask in masks)}
        info["tokens_dir"] = str(self.tokens_dir)
        info["tokens_build"] = read_manifest(self.tokens_dir)["summary"]
        if self.features_dir:
            info["features_dir"] = str(self.features_dir)
            info["features_build"] = read_manifest(self.features_dir)["summary"]
        return info


class PreparedDataset(torch.utils.data.Dataset):
    """Rows ``{"input_ids", "loss_mask", <feature_key(layer)>...}`` for ``PaddingCollator``."""

    def __init__(self, tokens: ShardReader, features: ShardReader | None, indices: list[int],
                 feature_names: list[str] | None = None):
        if features is not None and len(features) != len(tokens):
            raise ValueError(f"The feature cache holds {len(features)} examples, the token data {len(tokens)}; "
                             "rebuild with prepare-data.")
        self.tokens = tokens
        self.features = features
        self.indices = indices
        stored = features.shard_metadata(0)["layers"] if features is not None and len(features) else []
        self.feature_names = stored if feature_names is None else feature_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        index = self.indices[position]
        row = self.tokens.read(index, ["input_ids", "loss_mask"])
        result = {"input_ids": row["input_ids"].long(), "loss_mask": row["loss_mask"].long()}
        if self.features is not None:
            result.update(self.features.read(index, self.feature_names))
        return result


# ---------------------------------------------------------------------------------------------- building
def _folders(config: DataSection, tokenizer, target) -> tuple[Path, Path | None, dict, dict | None]:
    if needs_target(config) and target is None:
        raise ValueError("Self-distillation and feature caching need the target model.")
    target_id = model_identity(target) if needs_target(config) else None
    tokens_identity = token_identity(config, tokenizer, target_id)
    root = Path(config.cache_dir).expanduser()
    tokens_dir = root / f"tokens-{_digest(tokens_identity)}"
    layers = config.cached_features()
    if not layers:
        return tokens_dir, None, tokens_identity, None
    features_identity = {"version": PREPARED_FORMAT_VERSION, "stage": "features", "tokens": _digest(tokens_identity),
                         "target": target_id}
    resolved = [str(layer) for layer in resolve_layers(target, layers)]
    fingerprint = _digest({**features_identity, "layers": resolved, "dtype": config.feature_dtype,
                           "shard_tokens": config.feature_shard_tokens})
    return tokens_dir, root / f"features-{fingerprint}", tokens_identity, features_identity


def _chunks(count: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _token_shard(examples: list[dict]) -> dict[str, torch.Tensor]:
    if not examples:
        return {"input_ids": torch.zeros(0, dtype=torch.int32), "loss_mask": torch.zeros(0, dtype=torch.uint8),
                "offsets": torch.zeros(1, dtype=torch.int64)}
    rows = [{"input_ids": torch.tensor(example["input_ids"], dtype=torch.int32),
             "loss_mask": torch.tensor(example["loss_mask"], dtype=torch.uint8)} for example in examples]
    return flatten_examples(rows, ["input_ids", "loss_mask"])


def build_tokens(config: DataSection, tokenizer, target, folder: Path, identity: dict,
                 log: Callable[[str], None] = print, progress: bool = True) -> ShardReader:
    """Stage 1 (resumable): tokenized or self-distilled conversations as token shards in ``folder``.

    Shard ``k`` holds the conversations ``[k * chunk, (k + 1) * chunk)`` of the source in file order, so the
    data of ``num_conversations: N`` is a prefix of the data of any larger ``N``: a larger request appends
    shards, a smaller one reads the first conversations of a larger build.
    """
    from tqdm.auto import tqdm

    from .data import read_conversations

    writer = ShardWriter(folder, identity, prefix="tokens")
    conversations = read_conversations(config)
    distill = config.self_distillation
    size = config.self_distillation_chunk_conversations if distill else TOKENIZE_CHUNK
    chunks = _chunks(len(conversations), size)
    covered = writer.shards[-1]["conversations"][1] if writer.shards else 0
    if covered < len(conversations):
        if writer.shards and covered % size:  # a smaller build's partial last chunk: redo it in full
            writer.truncate(len(writer.shards) - 1)
        if writer.shards:
            log(f"[tokens] resuming after {len(writer.shards)} of {len(chunks)} shards")
        writer.reopen()
        settings = DistillSettings.from_data_section(config)
        bar = tqdm(total=None, unit="tok", desc="self-distillation" if distill else "tokenizing",
                   disable=not progress, mininterval=10)
        for index in range(len(writer.shards), len(chunks)):
            first, last = chunks[index]
            began = time.perf_counter()
            if distill:
                examples, stats = distill_conversations(target, tokenizer, conversations[first:last], settings,
                                                        seed_offset=index, on_tokens=bar.update)
            else:
                examples, stats = _tokenize_chunk(tokenizer, conversations[first:last], config.max_length), DistillStats()
            seconds = time.perf_counter() - began
            shard = _token_shard(examples)
            position = {cid: first + offset for offset, (cid, _) in enumerate(conversations[first:last])}
            record = {"conversations": [first, last], "examples": len(examples),
                      "tokens": int(shard["input_ids"].numel()), "assistant_tokens": int(shard["loss_mask"].sum()),
                      "seconds": round(seconds, 3),
                      **({f"distill_{key}": value for key, value in dataclasses.asdict(stats).items() if key != "seconds"}
                         if distill else {})}
            metadata = {"ids": [e["id"] for e in examples], "conversation_index": [position[e["id"]] for e in examples],
                        "temperatures": [e.get("temperature") for e in examples]}
            writer.write(shard, metadata, record)
            log(_token_progress_line(writer.shards, len(chunks), distill))
        bar.close()
    exhausted = config.num_conversations is None or len(conversations) < config.num_conversations
    if not writer.complete or (exhausted and not writer.manifest["summary"].get("source_exhausted")):
        writer.finish({**_tokens_summary(writer, folder), "source_exhausted": exhausted})
    return ShardReader(folder)


def _covers(tokens_manifest: dict, num_conversations: int | None) -> bool:
    """Whether a token folder holds every conversation a ``num_conversations`` request reads."""
    shards = tokens_manifest["shards"]
    covered = shards[-1]["conversations"][1] if shards else 0
    if tokens_manifest["summary"].get("source_exhausted"):
        return num_conversations is None or covered >= 0
    return num_conversations is not None and covered >= num_conversations


def _tokenize_chunk(tokenizer, conversations, max_length: int) -> list[dict]:
    examples = []
    for conversation_id, messages in conversations:
        example = tokenize_conversation(tokenizer, messages, max_length)
        if example is not None:
            examples.append({"id": conversation_id, **example, "temperature": None})
    return examples


def _token_progress_line(shards: list[dict], total: int, distill: bool) -> str:
    last = shards[-1]
    assistant = sum(shard["assistant_tokens"] for shard in shards)
    seconds = sum(shard["seconds"] for shard in shards)
    line = (f"[tokens] shard {len(shards)}/{total}: {last['examples']} examples, {last['assistant_tokens']} assistant "
            f"tokens in {last['seconds']:.0f} s; total {assistant} assistant tokens in {seconds / 60:.1f} min")
    if distill:
        generated = sum(shard["distill_generated_tokens"] for shard in shards)
        cut = sum(shard["distill_cut_replies"] for shard in shards)
        loops = sum(shard.get("distill_looping_replies", 0) for shard in shards)
        replies = sum(shard["distill_replies"] for shard in shards)
        line += (f" ({generated / max(seconds, 1e-9):.1f} generated tokens/s, {assistant / max(seconds, 1e-9):.1f} kept; "
                 f"{replies} replies with a loss; {cut - loops} cut by the length cap, {loops} degenerate loops)")
    return line


def _tokens_summary(writer: ShardWriter, folder: Path) -> dict:
    shards = writer.shards
    seconds = sum(shard["seconds"] for shard in shards)
    summary = {key: sum(shard[key] for shard in shards) for key in ("examples", "tokens", "assistant_tokens")}
    summary["conversations"] = shards[-1]["conversations"][1] if shards else 0
    summary["seconds"] = round(seconds, 1)
    if any("distill_generated_tokens" in shard for shard in shards):
        for key in ("replies", "cut_replies", "looping_replies", "generated_tokens", "padded_steps", "generate_calls"):
            summary[key] = sum(shard[f"distill_{key}"] for shard in shards)
        summary["generated_tokens_per_second"] = round(summary["generated_tokens"] / max(seconds, 1e-9), 2)
        summary["padding_efficiency"] = round(summary["generated_tokens"] / max(summary["padded_steps"], 1), 3)
    summary["bytes"] = sum((folder / shard["file"]).stat().st_size for shard in shards)
    return summary


def prepare_data(config, tokenizer, target=None, *, log: Callable[[str], None] = print,
                 progress: bool = True) -> PreparedData:
    """Build (or finish, or reuse) the token shards and the feature cache that ``config`` describes."""
    config = as_data_section(config)
    problems = data_section_problems(config)
    if problems:
        raise ValueError("Invalid data settings: " + "; ".join(problems) + ".")
    tokens_dir, features_dir, tokens_identity, features_identity = _folders(config, tokenizer, target)
    tokens = build_tokens(config, tokenizer, target, tokens_dir, tokens_identity, log=log, progress=progress)
    if features_dir is not None:
        cache_features(target, tokens, features_dir, config.cached_features(), identity=features_identity,
                       dtype=config.feature_dtype, shard_tokens=config.feature_shard_tokens,
                       batch_tokens=config.feature_batch_tokens, log=log)
    return PreparedData(config, tokens_dir, features_dir)


def load_prepared_data(config, tokenizer, target=None) -> PreparedData:
    """The data ``prepare_data`` built for ``config``, without building anything (for training processes)."""
    config = as_data_section(config)
    tokens_dir, features_dir, _, _ = _folders(config, tokenizer, target)
    tokens_manifest = read_manifest(tokens_dir)
    ready = tokens_manifest is not None and _covers(tokens_manifest, config.num_conversations)
    if ready and features_dir is not None:
        features_manifest = read_manifest(features_dir)
        examples = sum(shard["examples"] for shard in tokens_manifest["shards"])
        shards = features_manifest["shards"] if features_manifest else None
        ready = shards is not None and (shards[-1]["examples"][1] if shards else 0) >= examples
    if not ready:
        raise DataNotPreparedError(
            f"The training data for these settings is not built yet (under {config.cache_dir}). Build it once "
            "before launching training: hf-spec prepare-data --config <the same recipe config> (one process; "
            "rerun it to resume an interrupted build)."
        )
    return PreparedData(config, tokens_dir, features_dir)


# ---------------------------------------------------------------------------------------------- command line
def load_recipe_sections(path: str | None, overrides: list[str] | None = None):
    """``(ModelSection, DataSection)`` from a recipe YAML (other sections are left to the recipe)."""
    import yaml

    from .config import ConfigError, ModelSection, apply_override, build_section

    tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else {}
    tree = tree or {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    model = build_section(ModelSection, tree.get("model"), "the recipe config.model")
    data = build_section(DataSection, tree.get("data"), "the recipe config.data")
    problems = data_section_problems(data) + ([] if model.name_or_path else ["model.name_or_path is required"])
    if problems:
        raise ConfigError("Invalid recipe config: " + "; ".join(problems) + ".")
    return model, data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (its model: and data: sections are used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting, e.g. --set data.num_conversations=5000 (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="where the target runs (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (log lines only)")


def run_from_arguments(args) -> dict:
    from .models import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    model_section, data = load_recipe_sections(args.config, args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    target, tokenizer = load_target(model_section.name_or_path, model_section.dtype,
                                    model_section.attn_implementation)
    target.to(device)
    prepared = prepare_data(data, tokenizer, target if needs_target(data) else None,
                            log=lambda line: print(line, flush=True), progress=args.progress)
    info = prepared.info()
    info["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(info, indent=2, default=str), flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_spec.training.prepare_data", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run_from_arguments(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
