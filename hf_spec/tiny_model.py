"""``hf_spec:tiny-random-llama``: a tiny random Llama with a real tokenizer and chat template, for tests and CI.

A 2-layer Llama with hidden size 32 and tied embeddings like SmolLM2, and a byte-level tokenizer (256
byte tokens + ChatML specials) with a ChatML chat template: real text and real chat templates at
negligible cost, so every path that takes a model name (training recipes, the benchmark, the demo)
runs end to end in seconds. It is built deterministically on first use and cached (atomically) in the
models folder of ``hf_spec.models``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_NAME = "tiny-random-llama"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """Byte-level BPE with no merges: every UTF-8 byte is a token, plus the ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(TINY_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_random_llama(seed: int = 0) -> Path:
    """Build (once) and return the folder of the tiny random Llama."""
    from .models import models_dir

    folder = models_dir() / f"{TINY_NAME}-v1-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{TINY_NAME}-", dir=folder.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return folder
