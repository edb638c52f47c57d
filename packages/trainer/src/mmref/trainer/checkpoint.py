"""Checkpoints the inference server's ``/update_weights`` loads, and the file-less in-process handover.

A checkpoint is a directory with the model's ``config.json``, its weights as safetensors
shards in the training dtype (key names exactly as in the live module, tied weights once
under the embedding's name, which vLLM reads too), their index, and ``mmref.json`` with the
family and the weight version::

    ckpt/latest/
      config.json  mmref.json  {"family": "qwen2-vl", "weight_version": 12}
      model-00001-of-00002.safetensors  model-00002-of-00002.safetensors  model.safetensors.index.json

Under FSDP2 every rank walks the parameters in the same order and gathers each one
(``DTensor.full_tensor``, a collective); rank 0 buffers at most one shard
(``max_shard_bytes``) and writes it as it goes, so no process ever holds a full extra copy.
In one process ``copy_weights`` hands tensors to the engine's model instead (no file).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 1 << 30  # rank 0's write buffer: one shard; a larger single tensor is a shard of its own


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter and persistent buffer once, in module order; tied weights under their first name.

    Deterministic (object identity, not storage pointers) so every rank walks the same list.
    """
    persistent = set(model.state_dict().keys())
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        if name in persistent:
            yield name, tensor


def gathered_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``named_tensors`` unsharded, on the CPU, floating ones in ``dtype``; a collective per sharded tensor."""
    with torch.no_grad():
        for name, tensor in named_tensors(model):
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            cast = dtype if dtype is not None and full.is_floating_point() else full.dtype
            yield name, full.detach().to(device="cpu", dtype=cast)


def save_checkpoint(model: PreTrainedModel, directory: str | Path, family: str, weight_version: int,
                    dtype: torch.dtype | None = None, write: bool = True,
                    max_shard_bytes: int = SHARD_BYTES) -> Path | None:
    """Write the model's weights (in ``dtype``; None: as they are) atomically and return the directory.

    Under FSDP2 every rank calls this; only the one with ``write`` (rank 0) writes, and the others return None.
    """
    if not write:  # take part in each gather, in the same order, and keep nothing
        with torch.no_grad():
            for _, tensor in named_tensors(model):
                if hasattr(tensor, "full_tensor"):
                    tensor.full_tensor()
        return None
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: list[list[str]] = []  # the names in each shard written so far
    shard: dict[str, torch.Tensor] = {}
    size, failed = 0, None
    for name, tensor in gathered_tensors(model, dtype):
        if failed is not None:  # keep gathering: the other ranks are in these collectives
            continue
        nbytes = tensor.numel() * tensor.element_size()
        try:
            if shard and size + nbytes > max_shard_bytes:
                files.append(_write_shard(shard, tmp, len(files)))
                shard, size = {}, 0
        except OSError as exc:
            failed, shard = exc, {}
            continue
        shard[name], size = tensor.contiguous(), size + nbytes
    if failed is not None:
        raise failed
    files.append(_write_shard(shard, tmp, len(files)))
    weight_map = {}
    for i, names in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp / f"shard-{i}.tmp", tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # Every field, not the diff against a default config: building that default costs ~20 ms
    # (validated dataclasses), every step; from_pretrained reads either.
    (tmp / "config.json").write_text(model.config.to_json_string(use_diff=False))
    (tmp / "mmref.json").write_text(json.dumps({"family": family, "weight_version": weight_version}))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _write_shard(shard: dict[str, torch.Tensor], tmp: Path, i: int) -> list[str]:
    save_file(shard, str(tmp / f"shard-{i}.tmp"))
    return list(shard)


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> int:
    """Copy ``source``'s weights into ``target`` (same architecture; dtype and device converted); bytes copied."""
    sources = dict(named_tensors(source))
    nbytes = 0
    with torch.no_grad():
        for name, tensor in named_tensors(target):
            source_shape = tuple(sources[name].shape) if name in sources else None
            if source_shape != tuple(tensor.shape):
                raise ValueError(f"weight handover: {name} is {tuple(tensor.shape)} in the engine's model but "
                                 f"{source_shape or 'absent'} in the trainer's; they must be the same architecture")
            tensor.copy_(sources[name])
            nbytes += tensor.numel() * tensor.element_size()
    return nbytes


def checkpoint_nbytes(directory: str | Path) -> int:
    """Bytes of a checkpoint's weight files."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def sync_record(seconds: float, nbytes: int) -> dict[str, float]:
    """A step's weight-sync metrics: ``sync_s``, ``sync_bytes`` and ``sync_s_per_gb`` (1 GB = 1e9 bytes)."""
    return {"sync_s": seconds, "sync_bytes": nbytes, "sync_s_per_gb": seconds / max(nbytes / 1e9, 1e-12)}


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


def weight_files(directory: str | Path) -> list[Path]:
    """A checkpoint's safetensors files: those its index names, else ``model.safetensors``."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    raise FileNotFoundError(f"checkpoint {directory} has neither {INDEX} nor model.safetensors")


def load_weights_into(model: PreTrainedModel, directory: str | Path) -> int:
    """Load a checkpoint's weights into a model of the same architecture, one tensor at a time; its weight version."""
    meta = read_checkpoint_meta(directory)
    targets = dict(named_tensors(model))
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for path in weight_files(directory):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name not in targets:
                        unexpected.append(name)
                        continue
                    targets[name].copy_(f.get_tensor(name))
                    seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return int(meta["weight_version"])
