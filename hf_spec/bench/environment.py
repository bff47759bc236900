"""What a result depends on besides the code: software versions, CPU, threads, load, and the exact models.

Speedups measured on one machine do not transfer to another (Spec-Bench, Xia et al. 2024, reports
its GPU and runs every method there), so each result file records where it was measured.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
import transformers

import hf_spec
from hf_spec.models import hub_id
from hf_spec.offline_models import MARKER_FILE
from hf_spec.wheels import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def environment(threads: int) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_spec": hf_spec.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_env": {key: os.environ[key] for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if key in os.environ},
        "load_average": load_average(),
        "cuda": torch.cuda.is_available(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine disturbs timings."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def model_info(model, label: str) -> dict:
    """Class, size, dtype, Hub id when known and, for a model loaded from a folder, its path and SHA-256 of
    the weight files (and, for hf_spec's offline models, where they came from)."""
    info = {"label": label, "hub_id": hub_id(label), "class": type(model).__name__, "dtype": str(model.dtype),
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "num_hidden_layers": model.config.num_hidden_layers}
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if folder.is_dir():
        info["path"] = str(folder.resolve())
        info["sha256"] = {path.name: file_sha256(path) for path in sorted(folder.iterdir())
                          if path.name.endswith(WEIGHT_SUFFIXES)}
        marker = folder / MARKER_FILE
        if marker.is_file():
            info["source"] = json.loads(marker.read_text())
    return info

