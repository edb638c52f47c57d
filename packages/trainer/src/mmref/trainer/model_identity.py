"""What makes two model directories the same model, as one short digest (read without loading weights).

A remote ``mmref serve`` must serve the directory the trainer trains: same architecture,
same tokenizer, same starting weights. Hashing every weight byte of a 7 GB checkpoint takes
about 20 s, so the digest covers ``config.json`` (minus keys that only say how it was
saved), the tokenizer files, and the first ``WEIGHT_SAMPLE`` bytes of tensor data of each
weight file: two random inits or two training steps differ there::

    >>> model_identity("runs/x/model")   # doctest: +SKIP
    'a3f09c1e7b2d5e44'

The path is not part of it: the same directory mounted at another path on another host
has the same identity.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from mmref.trainer.policy import TOKENIZER_FILES, WEIGHT_FILES, WEIGHT_INDEXES

# config.json keys that record how a directory was written, not what model it holds.
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "dtype", "torch_dtype", "mmref_family"})
WEIGHT_SAMPLE = 1 << 20  # 1 MiB of tensor data per weight file: ~1 ms to read, differs between inits


def model_identity(path: str | Path) -> str:
    """A 16-hex-digit digest of ``path``'s config, tokenizer and starting weights."""
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    digest.update(json.dumps(_stable(config), sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + hashlib.sha256((path / name).read_bytes()).digest())
    for weights in _weight_files(path):
        digest.update(weights.name.encode() + _tensor_sample(weights))
    return digest.hexdigest()[:16]


def _stable(value: object) -> object:
    """``value`` without the volatile keys, at any depth (text and vision configs nest)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
    return value


def _weight_files(path: Path) -> list[Path]:
    """The directory's weight files in a fixed order: an index's shards, else the single file."""
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            shards = json.loads((path / index).read_text()).get("weight_map", {}).values()
            return [path / shard for shard in sorted(set(shards))]
    return [path / name for name in WEIGHT_FILES if (path / name).is_file()]


def _tensor_sample(file: Path) -> bytes:
    """The header and first ``WEIGHT_SAMPLE`` data bytes of a safetensors file (the first bytes of any other)."""
    with file.open("rb") as f:
        if file.suffix != ".safetensors":
            return f.read(WEIGHT_SAMPLE)
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = f.read(header_len)
        return hashlib.sha256(header + f.read(WEIGHT_SAMPLE)).digest()
