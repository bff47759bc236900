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

from pathlib import Path

import torch

from ..training.hub import (
    CheckpointError,
    load_config_dict,
    load_weights,
    push_folder_to_hub,
    resolve_pretrained,
    save_weights_and_config,
)


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
        """Files saved beside the weights (none by default)."""

    @classmethod
    def from_config(cls, config, folder: Path):
        """The (untrained) module ``config`` describes, with any companion files read from ``folder``."""
        return cls(config)

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
