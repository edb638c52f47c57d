"""Checkpoints the inference server's ``/update_weights`` loads.

A checkpoint is a directory in transformers' ``save_pretrained`` layout (``config.json`` +
``model.safetensors``) plus ``mmref.json`` with the family and the weight version::

    ckpt/step-000012/
      config.json  model.safetensors  mmref.json   {"family": "qwen2-vl", "weight_version": 12}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel


def save_checkpoint(model: PreTrainedModel, directory: str | Path, family: str, weight_version: int) -> Path:
    """Write the model atomically (temp dir + rename) and return the directory."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "mmref.json").write_text(json.dumps({"family": family, "weight_version": weight_version}))
    if directory.exists():
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()
    os.replace(tmp, directory)
    return directory


def read_checkpoint_meta(directory: str | Path) -> dict:
    """``mmref.json`` of a checkpoint (family, weight_version)."""
    path = Path(directory) / "mmref.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not an mmref checkpoint (no mmref.json)")
    return json.loads(path.read_text())


def load_weights_into(model: PreTrainedModel, directory: str | Path) -> int:
    """Load a checkpoint's weights into an existing model of the same architecture; returns its version."""
    meta = read_checkpoint_meta(directory)
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {directory} has no .safetensors file")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        model.tie_weights()
    return int(meta["weight_version"])
