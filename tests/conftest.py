"""Shared fixtures: tiny random models of each supported architecture, the real SmolLM2, and a hermetic
environment (no test depends on what the caller's shell or cluster job exported)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_spec.engine import goodput

LIBRARY_DEFAULT_DRAFT_LENGTH = goodput.DEFAULT_DRAFT_LENGTH

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, pad_token_id=0, eos_token_id=None)
ARCHITECTURES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, {"head_dim": 8, "sliding_window": 256}),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float64, **overrides):
    """A random tiny causal LM in float64, so tree vs sequential attention cannot flip an argmax."""
    model_cls, config_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    return model_cls(config).to(dtype).eval()


def tiny_prompt(seed: int = 0, length: int = 12, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (1, length), generator=generator)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct prepared by scripts/prepare_models.py."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_spec.offline_models import OfflineModelError, model_path

    try:
        path = model_path("smollm2-135m-instruct")
    except OfflineModelError as error:
        if os.environ.get("HF_SPEC_REQUIRE_REAL_MODELS") or os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------ a hermetic environment
# What a caller's shell or cluster job may export that would change what a test, or a process it starts, does.
HUB_VARIABLES = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",  # offline mode also blocks a local Hub
    "HF_ENDPOINT", "HUGGINGFACE_CO_STAGING",  # which Hub a client talks to
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",  # who it is
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE", "HF_XET_CACHE",  # its caches
)
LAUNCHER_VARIABLES = (  # a pytest started inside torchrun / accelerate / SLURM must not hand its rank to our launches
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)
LAUNCHER_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_")


def caller_variables(environ=os.environ) -> list[str]:
    """The names in ``environ`` that a test must not inherit (see ``HUB_VARIABLES``, ``LAUNCHER_VARIABLES``)."""
    return [name for name in environ
            if name in HUB_VARIABLES or name in LAUNCHER_VARIABLES or name.startswith(LAUNCHER_PREFIXES)]


@pytest.fixture(scope="session")
def hermetic_hf_home(tmp_path_factory) -> Path:
    """An empty ``HF_HOME`` for the session: no token, Hub cache or accelerate default config of the caller's."""
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(autouse=True)
def fixed_draft_length_by_default(monkeypatch):
    """Tests check drafters' own lengths and trees, so generate() drafts them every step unless a test passes
    draft_length="goodput": the cost-aware default chooses from wall-clock timings, which would make those counts
    vary from run to run (tests/test_goodput.py tests it explicitly)."""
    monkeypatch.setattr(goodput, "DEFAULT_DRAFT_LENGTH", "fixed")


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch, hermetic_hf_home):
    """Every test starts from the same environment, whatever the caller exported.

    * Subprocesses a test starts inherit ``os.environ``: the Hub switches, endpoint, credentials and caches
      and the distributed-launcher variables of the caller are removed from it, and ``HF_HOME`` is an empty
      session folder. A test that needs one of them sets it (a local Hub test: ``local_hub_env``).
      ``HF_HUB_OFFLINE=1``, common on clusters, would otherwise block the local Hub on 127.0.0.1.
    * In this process ``huggingface_hub`` read those variables at import; its offline switch is forced on
      here, so that an in-process test reaching for any Hub fails at once, with or without the caller's
      ``HF_HUB_OFFLINE`` (every in-process test loads local folders).
    """
    from huggingface_hub import constants

    for name in caller_variables():
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(hermetic_hf_home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def local_hub_env(endpoint: str, hf_home: str | Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that talks to the local Hub at ``endpoint`` and nothing else.

    huggingface_hub reads these variables once, at import, which is why Hub clients in tests run in a
    subprocess: online (offline mode would refuse 127.0.0.1), a fresh ``HF_HOME`` (cache and token), a
    dummy token, no telemetry or Xet transfers, CPU only, and this checkout importable.
    """
    env = {name: value for name, value in os.environ.items() if name not in caller_variables(os.environ)}
    env.update({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_TOKEN": "hf_local",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
                "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of thousands of tiny forwards: thread-pool overhead dominates there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
