"""Training data for draft heads: ShareGPT conversations -> tokenized, split, optionally enriched ``datasets``.

Steps (Medusa, Cai et al. 2024; EAGLE, Li et al. 2024 use the same recipe):

1. read the first ``num_conversations`` usable ShareGPT conversations (``sharegpt.py``);
2. assign each to ``train`` or ``heldout`` by a hash of its id and the seed: deterministic, independent
   of order and of how many conversations are read (a larger run's held-out set contains a smaller
   run's);
3. optionally regenerate the assistant turns with the target (self-distillation, ``self_distill.py``);
4. render with the target's chat template and mark assistant tokens (``chat_tokens.py``);
5. optionally cache the frozen target's last hidden states (float16) so Medusa-1 epochs skip the
   target's forward.

The teacher-forced soft labels (the target's own next-token distributions) are computed during
training from the hidden states through the frozen ``lm_head``: storing ``V``-wide distributions per
token would cost far more disk than the hidden states they come from.

The result is saved with ``DatasetDict.save_to_disk`` under ``cache_dir/<fingerprint>`` (fingerprint of
the data settings, tokenizer and, where it matters, the target), written atomically and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .chat_tokens import tokenize_conversation
from .config import DataSection
from .self_distill import regenerate_all
from .sharegpt import iter_sharegpt

DATA_FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
BUILD_INFO = "hf_spec_build_info.json"


def is_heldout(conversation_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def limit_turns(messages: list[dict], max_turns: int | None) -> list[dict]:
    """Keep an optional system message and the first ``max_turns`` user/assistant exchanges."""
    if max_turns is None:
        return messages
    system = messages[:1] if messages[0]["role"] == "system" else []
    return system + messages[len(system): len(system) + 2 * max_turns]


def read_conversations(config: DataSection) -> list[tuple[str, list[dict]]]:
    path = None if config.source == "sharegpt" else config.source
    return [(cid, limit_turns(messages, config.max_turns))
            for cid, messages in iter_sharegpt(path, config.num_conversations)]


def fingerprint(config: DataSection, tokenizer, target_identity: str) -> str:
    """Key of a built dataset: data settings, tokenizer, and the target when the target shaped the data."""
    settings = asdict(config)
    settings.pop("cache_dir")
    needs_target = config.self_distillation or config.cache_hidden_states
    identity = {
        "version": DATA_FORMAT_VERSION,
        "data": settings,
        "tokenizer": [tokenizer.name_or_path, len(tokenizer), hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()],
        "target": target_identity if needs_target else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_folder(config: DataSection, tokenizer, target_identity: str = "") -> Path:
    """Where ``build_datasets`` keeps (or finds) the datasets for these settings."""
    return Path(config.cache_dir) / fingerprint(config, tokenizer, target_identity)


def build_datasets(config: DataSection, tokenizer, target=None, target_identity: str = "",
                   disable_progress: bool = False):
    """``DatasetDict(train=..., heldout=...)`` with ``input_ids``, ``loss_mask`` (and ``hidden``), cached on disk."""
    from datasets import load_from_disk

    folder = dataset_folder(config, tokenizer, target_identity)
    if not (folder / BUILD_INFO).is_file():
        needs_target = config.self_distillation or config.cache_hidden_states
        if needs_target and target is None:
            raise ValueError("Self-distillation and hidden-state caching need the target model.")
        datasets = _build(config, tokenizer, target, disable_progress)
        _save_atomically(datasets, folder, _build_info(datasets, config))
    return load_from_disk(str(folder))


def _build(config: DataSection, tokenizer, target, disable_progress: bool):
    from datasets import Dataset, DatasetDict

    conversations = read_conversations(config)
    if config.self_distillation:
        conversations = regenerate_all(
            target, tokenizer, conversations, max_new_tokens=config.self_distillation_max_new_tokens,
            max_length=config.max_length, do_sample=config.self_distillation_do_sample,
            temperature=config.self_distillation_temperature, seed=config.seed, disable_progress=disable_progress)
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for conversation_id, messages in conversations:
        example = tokenize_conversation(tokenizer, messages, config.max_length)
        if example is not None:
            split = "heldout" if is_heldout(conversation_id, config.seed, config.heldout_fraction) else "train"
            rows[split].append({"id": conversation_id, **example})
    empty = [split for split in SPLITS if not rows[split]]
    if empty:
        raise ValueError(f"The {empty} split(s) came out empty from {len(conversations)} conversations; read more "
                         "(data.num_conversations), raise data.heldout_fraction or data.max_length.")
    datasets = DatasetDict({split: Dataset.from_list(rows[split]) for split in SPLITS})
    if config.cache_hidden_states:
        datasets = add_hidden_states(datasets, target, disable_progress)
    return datasets


def add_hidden_states(datasets, target, disable_progress: bool = False):
    """Add a ``hidden`` column: the frozen target's last-layer (post-norm) hidden states, float16."""
    from datasets import Array2D

    backbone = target.get_decoder()
    hidden_size = target.config.get_text_config().hidden_size

    @torch.no_grad()
    def compute(example):
        ids = torch.tensor([example["input_ids"]], device=target.device)
        states = backbone(input_ids=ids).last_hidden_state[0]
        return {"hidden": states.to(torch.float16).cpu().numpy()}

    features = datasets["train"].features.copy()
    features["hidden"] = Array2D(shape=(None, hidden_size), dtype="float16")
    return datasets.map(compute, features=features, desc="caching target hidden states")


def _build_info(datasets, config: DataSection | None) -> dict:
    info = {}
    for split in SPLITS:
        dataset = datasets[split]
        lengths = [len(ids) for ids in dataset["input_ids"]]
        info[split] = {"examples": len(dataset), "tokens": sum(lengths),
                       "assistant_tokens": int(sum(sum(mask) for mask in dataset["loss_mask"]))}
    if config is not None:
        info["config"] = asdict(config)
    return info


def _save_atomically(datasets, folder: Path, info: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    datasets.save_to_disk(str(staging))
    (staging / BUILD_INFO).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    try:
        os.replace(staging, folder)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(staging, ignore_errors=True)


def load_build_info(folder: Path) -> dict:
    """Counts (examples, tokens, assistant tokens per split) and settings of a built dataset."""
    return json.loads((Path(folder) / BUILD_INFO).read_text(encoding="utf-8"))


@dataclass
class PaddingCollator:
    """Right-pads ``input_ids`` / ``loss_mask`` (and ``hidden``) into a batch with an ``attention_mask``."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        loss_mask = torch.zeros(batch, length, dtype=torch.bool)
        hidden = None
        for index, row in enumerate(rows):
            size = len(row["input_ids"])
            input_ids[index, :size] = torch.as_tensor(row["input_ids"])
            attention_mask[index, :size] = 1
            loss_mask[index, :size] = torch.as_tensor(row["loss_mask"]).bool()
            if "hidden" in row:
                states = torch.as_tensor(row["hidden"])
                if hidden is None:
                    hidden = torch.zeros(batch, length, states.shape[-1], dtype=torch.float32)
                hidden[index, :size] = states.float()
        result = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
        if hidden is not None:
            result["hidden"] = hidden
        return result


def training_columns(dataset):
    """The dataset formatted for the collator (tensors; the ``id`` column dropped)."""
    columns = [name for name in ("input_ids", "loss_mask", "hidden") if name in dataset.column_names]
    return dataset.with_format("torch", columns=columns)
