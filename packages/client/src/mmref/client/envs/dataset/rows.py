"""Dataset rows from local files, and a row's images as message parts.

    rows = read_rows("data/train.jsonl")        # JSONL; Parquet (.parquet) when pyarrow is installed;
    rows = read_rows("data/saved")              # a `datasets` dataset saved with save_to_disk
    parts = image_parts(row["image"], "image", "row 3")

An image value is one image or a list of them, each:

| value                                  | becomes                                               |
|----------------------------------------|-------------------------------------------------------|
| ``"shapes/0001.png"`` (str, no scheme) | a path relative to the dataset file's directory,      |
|                                        | read by the client (the environment's ``image_root``) |
| ``"data:image/png;base64,..."``        | as is                                                 |
| ``bytes`` / ``{"bytes": b"..."}``      | the encoded file (Parquet; ``datasets`` Image feature)|
| ``{"bytes": "<base64>"}``              | base64 text of the encoded file (JSONL)               |
| ``{"path": "..."}``                    | a path, as a str                                      |
| a PIL image                            | as is                                                 |
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from mmref.client.errors import DatasetError
from mmref.renderers.store import sniff_media_type


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a JSONL (``.jsonl``/``.json``) or Parquet (``.parquet``) file, or of a ``datasets``
    dataset saved with ``save_to_disk`` (a directory; a ``DatasetDict``'s rows get its split name in ``split``)."""
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{number} is a JSON {type(row).__name__}; each line must be an object")
        rows.append(row)
    if not rows:
        raise DatasetError(f"dataset file {path} has no rows")
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to JSONL") from None
    return pq.read_table(path).to_pylist()


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DatasetError(f"reading the saved dataset {path} needs the datasets package (pip install datasets)") \
            from None
    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DatasetError(f"{path} is not a dataset saved with save_to_disk: {exc}") from None
    if not isinstance(data, DatasetDict):
        rows = list(data)
    elif any("split" in part.column_names for part in data.values()):
        raise DatasetError(f"{path}: its splits have a 'split' column already; save each split on its own")
    else:
        rows = [row | {"split": name} for name, part in data.items() for row in part]
    if not rows:
        raise DatasetError(f"dataset {path} has no rows")
    return rows


def image_parts(value: Any, column: str, where: str) -> list[dict[str, Any]]:
    """The image parts (``{"type": "image", "image": source}``) of one row's image column."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise DatasetError(f"{where}: image column {column!r} is empty")
    return [{"type": "image", "image": _source(v, column, where)} for v in values]


def _source(value: Any, column: str, where: str) -> Any:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _data_url(value["bytes"], column, where)
        if value.get("path") is not None:
            return Path(value["path"])
        raise DatasetError(f"{where}: image in column {column!r} is an object without 'bytes' or 'path'")
    if isinstance(value, bytes):
        return _data_url(value, column, where)
    if isinstance(value, str):
        return value if value.startswith("data:") else Path(value)
    raise DatasetError(f"{where}: column {column!r} holds a {type(value).__name__}; expected an image path, "
                       "data URL, bytes or PIL image")


def _data_url(data: bytes | str, column: str, where: str) -> str:
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise DatasetError(f"{where}: column {column!r} has 'bytes' text that is not base64") from None
    media_type = sniff_media_type(data)
    if media_type is None:
        raise DatasetError(f"{where}: image bytes in column {column!r} are no PNG, JPEG, GIF or WebP file")
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def open_image(source: Any, root: Path) -> Image.Image:
    """A source from ``image_parts`` decoded (for the blank-image ablation, which needs sizes)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, Path):
        return Image.open(root / source)
    return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
