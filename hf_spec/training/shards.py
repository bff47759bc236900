"""A folder of safetensors shards with a manifest: written atomically, resumable, read lazily.

Both the token data (self-distilled or tokenized conversations) and the feature cache are stored this way:
each shard holds the concatenated rows of a run of consecutive examples (a flat ``(tokens, ...)`` tensor per
field plus ``offsets``, the start of each example), so memory while writing is bounded by one shard, and a
reader memory-maps one slice per example. A shard is written to a temporary file and renamed; the manifest
(``manifest.json``) is rewritten atomically after each shard, so a killed run leaves only complete shards
listed and the next run continues after the last one. A writer holds an exclusive lock on the folder
(``.lock``, ``fcntl.flock``) for as long as it exists, so a second build of the same data fails at once
instead of overwriting the first one's shards.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

MANIFEST = "manifest.json"
LOCK = ".lock"


class ShardStoreError(ValueError):
    """A shard folder does not belong to these settings, or is incomplete or damaged."""


def atomic_write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(value, stream, indent=1, default=str)
    os.replace(staging, path)


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class ShardWriter:
    """Appends shards to ``folder``; ``identity`` (JSON-able) must match the manifest of an existing folder."""

    def __init__(self, folder: str | Path, identity: dict, prefix: str):
        self.folder = Path(folder)
        self.prefix = prefix
        manifest = read_manifest(self.folder)
        canonical = json.loads(json.dumps(identity, default=str))
        if manifest is not None and manifest["identity"] != canonical:
            raise ShardStoreError(f"{self.folder} holds shards built with other settings; remove it or use another "
                                  "cache_dir.")
        self.manifest = manifest or {"identity": canonical, "shards": [], "complete": False, "summary": {}}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_folder(self.folder)

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def write(self, tensors: dict[str, torch.Tensor], metadata: dict, record: dict) -> dict:
        """Write one shard (``tensors`` plus JSON ``metadata``) and list it with ``record`` in the manifest."""
        from safetensors.torch import save_file

        name = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        handle, staging = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        os.close(handle)
        save_file({key: value.contiguous() for key, value in tensors.items()}, staging,
                  metadata={"hf_spec": json.dumps(metadata)})
        os.replace(staging, self.folder / name)
        entry = {"file": name, **record}
        self.shards.append(entry)
        atomic_write_json(self.folder / MANIFEST, self.manifest)
        return entry

    def truncate(self, count: int) -> None:
        """Forget every shard after the first ``count`` (their files are removed) and mark the folder unfinished."""
        for shard in self.shards[count:]:
            (self.folder / shard["file"]).unlink(missing_ok=True)
        del self.shards[count:]
        self.manifest["complete"] = False
        atomic_write_json(self.folder / MANIFEST, self.manifest)

    def reopen(self) -> None:
        """Mark a finished folder unfinished, to append more shards."""
        self.manifest["complete"] = False
        atomic_write_json(self.folder / MANIFEST, self.manifest)

    def finish(self, summary: dict) -> None:
        self.manifest["complete"] = True
        self.manifest["summary"] = summary
        atomic_write_json(self.folder / MANIFEST, self.manifest)


def _lock_folder(folder: Path):
    """An open file holding an exclusive lock on ``folder`` (released when it is closed or the process ends)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; concurrent builds are the user's responsibility
        return None
    handle = open(folder / LOCK, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ShardStoreError(f"{folder} is being written by another process (another prepare-data, or a one-process "
                              "training run building its data); wait for it to finish.") from None
    return handle


def flatten_examples(examples: list[dict[str, torch.Tensor]], fields: list[str]) -> dict[str, torch.Tensor]:
    """Concatenate per-example ``(length, ...)`` tensors field by field, with ``offsets`` of each example."""
    lengths = torch.tensor([len(example[fields[0]]) for example in examples], dtype=torch.int64)
    offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = {name: torch.cat([example[name] for example in examples]) for name in fields}
    flat["offsets"] = offsets
    return flat


class ShardReader:
    """Random access to the examples of a complete shard folder (slices are memory-mapped on demand)."""

    def __init__(self, folder: str | Path, allow_incomplete: bool = False):
        from safetensors import safe_open

        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise ShardStoreError(f"{self.folder} has no {MANIFEST}: it was never built (run prepare-data).")
        if not manifest["complete"] and not allow_incomplete:
            raise ShardStoreError(f"{self.folder} is incomplete (the build stopped early); run prepare-data again "
                                  "to finish it.")
        self.manifest = manifest
        self._open = safe_open
        self._handles: dict[int, object] = {}
        self._offsets: list[torch.Tensor] = []
        self._metadata: list[dict] = []
        starts = [0]
        for index, shard in enumerate(manifest["shards"]):
            handle = self._handle(index)
            self._offsets.append(handle.get_tensor("offsets"))
            self._metadata.append(json.loads(handle.metadata()["hf_spec"]))
            starts.append(starts[-1] + len(self._offsets[-1]) - 1)
        self._starts = torch.tensor(starts, dtype=torch.int64)

    def _handle(self, shard: int):
        if shard not in self._handles:
            path = self.folder / self.manifest["shards"][shard]["file"]
            if not path.is_file():
                raise ShardStoreError(f"{path} is listed in the manifest but missing; rebuild {self.folder}.")
            self._handles[shard] = self._open(str(path), framework="pt")
        return self._handles[shard]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, example within shard)`` of global example ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range 0..{len(self) - 1}")
        shard = int(torch.searchsorted(self._starts, torch.tensor(index), right=True)) - 1
        return shard, index - int(self._starts[shard])

    def metadata(self, index: int, key: str):
        """Per-example metadata ``key`` (a list in each shard's metadata) of global example ``index``."""
        shard, row = self.locate(index)
        return self._metadata[shard][key][row]

    def shard_metadata(self, shard: int) -> dict:
        return self._metadata[shard]

    def column(self, key: str) -> list:
        """A per-example metadata list over all shards (e.g. conversation ids)."""
        return [value for metadata in self._metadata for value in metadata[key]]

    def read(self, index: int, fields: list[str]) -> dict[str, torch.Tensor]:
        shard, row = self.locate(index)
        offsets = self._offsets[shard]
        start, end = int(offsets[row]), int(offsets[row + 1])
        handle = self._handle(shard)
        return {name: handle.get_slice(name)[start:end] for name in fields}

    def __getstate__(self):  # DataLoader workers reopen the files
        state = dict(self.__dict__)
        state["_handles"] = {}
        state["_open"] = None
        return state

    def __setstate__(self, state):
        from safetensors import safe_open

        self.__dict__.update(state)
        self._open = safe_open
