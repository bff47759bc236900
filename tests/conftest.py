"""Shared fixtures: tiny random models of each supported architecture, and the real SmolLM2."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of thousands of tiny forwards: thread-pool overhead dominates there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
