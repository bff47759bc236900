"""Files of trainable drafters on disk and on the Hugging Face Hub.

Every trainable drafter is a folder: ``config.json`` + ``model.safetensors`` (+ ``README.md``, the model
card). Saving is atomic per file (write a temporary file beside the target, then ``os.replace``), so
an interrupted save never leaves a truncated checkpoint. Loading resolves a local folder or a Hub
repo id through ``huggingface_hub`` (honouring ``HF_ENDPOINT``, ``HF_TOKEN``, the local cache and
offline mode) and only ever reads JSON and safetensors: nothing is unpickled, no code is executed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"
# What from_pretrained downloads from a Hub repo: never pickles or code.
LOADABLE_PATTERNS = ["*.json", "*.safetensors", "*.md"]
MODEL_CARDS_DIR = Path(__file__).resolve().parent / "cards"  # package data: templates ship with hf_spec


class CheckpointError(ValueError):
    """A drafter checkpoint is missing, corrupt, or does not match what loads it."""


# ---------------------------------------------------------------------------- writing
def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then move the result onto ``path`` in one ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def save_weights_and_config(directory: str | Path, state_dict: dict[str, torch.Tensor], config: dict,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.safetensors`` then ``config.json`` into ``directory`` (each atomically)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda temporary: save_file(tensors, temporary, metadata=metadata))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


# ---------------------------------------------------------------------------- reading
def resolve_pretrained(path_or_id: str | Path, *, revision: str | None = None, token: str | bool | None = None,
                       cache_dir: str | Path | None = None, local_files_only: bool = False) -> Path:
    """A local folder holding the checkpoint: ``path_or_id`` itself, or a Hub repo snapshot."""
    candidate = Path(path_or_id).expanduser()
    if candidate.is_dir():
        return candidate
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep + os.sep in text:
        raise CheckpointError(f"No checkpoint folder at {text!r}: the directory does not exist.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(text, revision=revision, token=token, cache_dir=cache_dir,
                                   local_files_only=local_files_only, allow_patterns=LOADABLE_PATTERNS)
    except RepositoryNotFoundError as error:
        raise CheckpointError(f"{text!r} is neither a local folder nor a Hub repository you can access "
                              f"(check the id, HF_ENDPOINT and HF_TOKEN): {error}") from error
    except LocalEntryNotFoundError as error:
        raise CheckpointError(f"{text!r} is not a local folder and is not in the Hub cache, and the Hub cannot "
                              f"be reached (offline?): {error}") from error
    except HfHubHTTPError as error:
        raise CheckpointError(f"Could not download {text!r} from the Hub: {error}") from error
    return Path(folder)


def load_config_dict(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; it is not an hf_spec drafter checkpoint.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON (corrupt checkpoint?): {error}") from error


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} (hf_spec reads safetensors only, never pickles).")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read as safetensors (corrupt or truncated checkpoint): {error}") from error


# ---------------------------------------------------------------------------- publishing
def render_model_card(template_name: str, card_data: dict, template_dir: str | Path | None = None, **values) -> str:
    """Render ``hf_spec/training/cards/<template_name>`` (Jinja) with ``values``; ``card_data`` becomes the YAML
    header. ``template_dir`` points at another folder of templates."""
    from huggingface_hub import ModelCard, ModelCardData

    template_path = Path(template_dir or MODEL_CARDS_DIR) / template_name
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template {template_path} not found; pass template_dir= to point at "
                                "a folder holding it (hf_spec's own templates are in hf_spec/training/cards/).")
    card = ModelCard.from_template(ModelCardData(**card_data), template_path=str(template_path), **values)
    return str(card)


def push_folder_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                       revision: str | None = None, commit_message: str = "Upload hf_spec drafter",
                       ignore_patterns: list[str] | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                               commit_message=commit_message, ignore_patterns=ignore_patterns)
    return str(commit)
