"""Checkpoints the inference server's ``/update_weights`` loads.

A checkpoint is a directory with the model's ``config.json``, its state dict as
``model.safetensors`` (key names exactly as in the live module, tied weights once under
the embedding's name, which vLLM reads too) and
``mmref.json`` with the family and the weight version::

    ckpt/step-000012/
      config.json  model.safetensors  mmref.json   {"family": "qwen2-vl", "weight_version": 12}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file
from transformers import PreTrainedModel


def save_checkpoint(model: PreTrainedModel, directory: str | Path, family: str, weight_version: int) -> Path:
    """Write the model atomically (temp dir + rename) and return the directory."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    save_file(first_names(model.state_dict()), str(tmp / "model.safetensors"))
    (tmp / "mmref.json").write_text(json.dumps({"family": family, "weight_version": weight_version}))
    if directory.exists():
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()
    os.replace(tmp, directory)
    return directory


def first_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per storage, under its first name in module order.

    Tied weights keep the input embedding's name (``...embed_tokens.weight``), which is the
    name Hugging Face and vLLM loaders read; ``lm_head.weight`` is dropped as its alias.
    """
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            kept[name] = tensor.contiguous()
    return kept


def read_checkpoint_meta(directory: str | Path) -> dict:
    """``mmref.json`` of a checkpoint (family, weight_version)."""
    path = Path(directory) / "mmref.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not an mmref checkpoint (no mmref.json)")
    return json.loads(path.read_text())


def weight_version_of(directory: str | Path) -> int:
    """The weight version an mmref checkpoint or step export records; 0 for any other model directory."""
    path = Path(directory) / "mmref.json"
    return int(json.loads(path.read_text())["weight_version"]) if path.exists() else 0


def load_weights_into(model: PreTrainedModel, directory: str | Path) -> int:
    """Load a checkpoint's weights into a model of the same architecture; returns its weight version."""
    meta = read_checkpoint_meta(directory)
    path = Path(directory) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory} has no model.safetensors")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return int(meta["weight_version"])
