"""Where recipe targets come from: local folders, Hub ids, hf_spec's offline models, and a tiny random model.

``hf_spec:tiny-random-llama`` is a 2-layer Llama with hidden size 32, tied embeddings like SmolLM2, and
a byte-level tokenizer (256 byte tokens + ChatML specials) with a ChatML chat template: real text and
real chat templates at negligible cost, so every training path runs end to end in tests and CI.
It is built deterministically on first use and cached (atomically) under ``~/.cache/hf_spec/models``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

PREFIX = "hf_spec:"
TINY_NAME = "tiny-random-llama"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def models_cache() -> Path:
    root = os.environ.get("HF_SPEC_MODELS_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_spec" / "models"
    return Path(root)


def resolve_model_path(name_or_path: str) -> str:
    """A path or Hub id that ``from_pretrained`` understands."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX):]
    if name == TINY_NAME:
        return str(tiny_random_llama())
    from ..offline_models import model_path

    return str(model_path(name))


def load_target(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None):
    """``(model, tokenizer)`` of the target, in train mode off (eval) and with ``use_cache`` off for training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.use_cache = False
    return model.eval(), tokenizer


@contextmanager
def unpartitioned():
    """Load and run whole models on this rank alone while a DeepSpeed ZeRO-3 launch is active.

    accelerate registers its DeepSpeed config with transformers even with ``zero3_init_flag: false``;
    ``from_pretrained`` would then partition the weights with ``deepspeed.zero.Init`` (a collective call:
    it hangs when one rank loads alone) and ``generate()`` would sync with ranks that are not generating.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    holder = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)  # transformers keeps it only as a weakref
    config_object = holder() if holder is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config_object is not None:
            hf_deepspeed.set_hf_deepspeed_config(config_object)


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
    """Build (once) and return the folder of the tiny random Llama target."""
    folder = models_cache() / f"{TINY_NAME}-v1-seed{seed}"
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
