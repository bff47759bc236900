"""Trained drafters (Medusa heads, EAGLE-3 layers) on disk and on the Hub: ``config.json`` +
``model.safetensors`` (+ ``README.md``), nothing pickled.

``SavedHeads`` gives a heads module ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` in the
``PreTrainedModel`` style, through ``hf_spec.training.hub`` (atomic writes, Hub resolution, safetensors only).
A module using it sets ``config_class`` (with ``to_dict`` / ``from_dict``) and ``method_name``, and has
``check_compatible(target)``. Files that travel with the weights (e.g. a draft vocabulary) are written by
``save_companion_files`` before ``config.json`` (which comes last, so a folder whose config is complete has
them) and read back by ``from_config``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UnsupportedError
from ..training.hub import (
    CheckpointError,
    load_config_dict,
    load_weights,
    push_folder_to_hub,
    resolve_pretrained,
    save_weights_and_config,
)
from .draft_vocab import CONFIG_NAME as VOCAB_CONFIG_NAME
from .draft_vocab import WEIGHTS_NAME as VOCAB_WEIGHTS_NAME
from .draft_vocab import DraftVocabulary

logger = logging.getLogger(__name__)


class SavedHeads:
    """Persistence of a ``torch.nn.Module`` of draft heads described by ``self.config``."""

    config_class: type
    method_name: str

    def save_pretrained(self, save_directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (atomically) into ``save_directory``.

        ``state_dict`` overrides the module's own tensors (e.g. parameters gathered under ZeRO-3).
        """
        tensors = state_dict if state_dict is not None else self.state_dict()
        self.save_companion_files(Path(save_directory))
        return save_weights_and_config(save_directory, tensors, self.config.to_dict(),
                                       metadata={"format": "pt", "hf_spec_method": self.method_name})

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, target=None, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False):
        """Load heads from a local folder or a Hub repo id; with ``target``, check and place them on it."""
        folder = resolve_pretrained(path_or_id, revision=revision, token=token, cache_dir=cache_dir,
                                    local_files_only=local_files_only)
        heads = cls.from_config(cls.config_class.from_dict(load_config_dict(folder)), folder)
        heads.load_checked_state_dict(load_weights(folder), source=str(path_or_id))
        heads.source = folder
        if target is not None:
            heads.check_compatible(target)
            weight = target.get_output_embeddings().weight
            heads.to(device=weight.device, dtype=weight.dtype)
        return heads.eval()

    def save_companion_files(self, directory: Path) -> None:
        """Files saved beside the weights: the draft vocabulary (``draft_vocab.safetensors`` + ``.json``), if any."""
        if getattr(self, "draft_vocab", None) is not None:
            self.draft_vocab.save(directory)

    @classmethod
    def from_config(cls, config, folder: Path):
        """The (untrained) module ``config`` describes, with the draft vocabulary ``config`` names read from
        ``folder``."""
        size = getattr(config, "draft_vocab_size", None)
        if size is None:
            return cls(config)
        try:
            vocabulary = DraftVocabulary.load(folder)
        except (OSError, ValueError, KeyError) as error:
            raise CheckpointError(f"{folder}: config.json says the draft scores a {size}-token draft vocabulary, but "
                                  f"{VOCAB_WEIGHTS_NAME} / {VOCAB_CONFIG_NAME} cannot be read (missing or corrupt "
                                  f"checkpoint): {error}") from error
        try:
            return cls(config, vocabulary)
        except ValueError as error:
            raise CheckpointError(f"{folder}: {error}") from error

    def load_checked_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source} does not match its config.json: missing tensors {missing[:6]}, "
                                  f"unexpected tensors {unexpected[:6]} (corrupt or mismatched checkpoint).")
        for name, tensor in state_dict.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                                      f"{tuple(expected[name].shape)} (corrupt or mismatched checkpoint).")
        dtypes = {tensor.dtype for tensor in state_dict.values()}
        if len(dtypes) == 1:  # keep the checkpoint's precision (a float64 save loads as float64)
            self.to(dtype=dtypes.pop())
            expected = self.state_dict()
        self.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in state_dict.items()})

    def push_to_hub(self, repo_id: str, *, model_card: str | None = None, token: str | None = None,
                    private: bool | None = None, commit_message: str | None = None,
                    extra_folder: str | Path | None = None) -> str:
        """Save into a temporary folder (plus ``README.md`` = ``model_card``) and upload it as one commit.

        ``extra_folder`` (e.g. a Medusa-2 adapter folder) is uploaded alongside, under ``config.adapter``.
        """
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as staging:
            self.save_pretrained(staging)
            if model_card is not None:
                Path(staging, "README.md").write_text(model_card, encoding="utf-8")
            if extra_folder is not None:
                if not self.config.adapter:
                    raise ValueError("extra_folder is uploaded under config.adapter, which is not set.")
                shutil.copytree(extra_folder, Path(staging, self.config.adapter))
            return push_folder_to_hub(staging, repo_id, token=token, private=private,
                                      commit_message=commit_message or f"Upload {self.method_name} heads")


# ---------------------------------------------------------------------------- checks shared by trained drafters
def check_draft_vocab(config, draft_vocab: DraftVocabulary | None, name: str) -> None:
    """``ValueError`` unless ``config.draft_vocab_size`` and ``draft_vocab`` describe the same vocabulary of the same
    target (``name``: the drafter, for messages, e.g. ``"Medusa heads"``)."""
    if draft_vocab is None:
        if config.draft_vocab_size is not None:
            raise ValueError(f"This {name} config scores a {config.draft_vocab_size}-token draft vocabulary: pass it as "
                             "draft_vocab= (DraftVocabulary.load(folder)), or load the checkpoint with from_pretrained.")
        return
    if not isinstance(draft_vocab, DraftVocabulary):
        raise TypeError(f"draft_vocab must be a DraftVocabulary, got {type(draft_vocab).__name__}.")
    if config.draft_vocab_size != draft_vocab.size:
        raise ValueError(f"The draft vocabulary has {draft_vocab.size} tokens but the {name} config says "
                         f"draft_vocab_size={config.draft_vocab_size}; the files disagree (or build the module with "
                         "for_target(..., draft_vocab=...), which sets it).")
    if draft_vocab.target_vocab_size != config.vocab_size:
        raise ValueError(f"The draft vocabulary maps a {draft_vocab.target_vocab_size}-token vocabulary but the {name} "
                         f"are for a {config.vocab_size}-token target; select it from this target's outputs.")


def target_head_shape(target) -> tuple[int, int]:
    """``(vocab rows, hidden size)`` of the target's output embedding."""
    output = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None
    if output is None or not hasattr(output, "weight"):
        raise UnsupportedError(f"{type(target).__name__} has no output embedding (lm_head); draft heads need a "
                               "causal LM.")
    shape = tuple(output.weight.shape)
    if len(shape) != 2 or 0 in shape:
        text_config = target.config.get_text_config()
        return text_config.vocab_size, text_config.hidden_size
    return shape[0], shape[1]


def check_target(config, target, name: str, recipe: str, note_base_model: bool = True) -> None:
    """``UnsupportedError`` naming every way ``target`` differs from what ``config`` was trained for (hidden size,
    vocabulary, and ``num_target_layers`` when the config has it); with ``note_base_model``, log when only the name
    differs."""
    vocab_size, hidden_size = target_head_shape(target)
    problems = []
    if hidden_size != config.hidden_size:
        problems.append(f"hidden size {config.hidden_size} (target: {hidden_size})")
    if vocab_size != config.vocab_size:
        problems.append(f"vocabulary {config.vocab_size} (target's lm_head: {vocab_size})")
    layers = getattr(config, "num_target_layers", None)
    if layers is not None and layers != target.config.get_text_config().num_hidden_layers:
        problems.append(f"{layers} target layers (target: {target.config.get_text_config().num_hidden_layers})")
    if problems:
        raise UnsupportedError(f"These {name} were trained for another model ({config.base_model or 'unknown base'}): "
                               f"{'; '.join(problems)}. Load a checkpoint trained for this target, or train one with "
                               f"{recipe}.")
    base, current = config.base_model, getattr(target.config, "_name_or_path", None)
    if note_base_model and base and current and Path(str(base)).name != Path(str(current)).name:
        logger.info("%s trained for %s, the target is %s; shapes match.", name, base, current)
