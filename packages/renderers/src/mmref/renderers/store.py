"""Content-addressed, write-once image store.

Images are the run's source of truth: the store keeps their encoded bytes under
``<sha256[:16]>.<ext>`` and every read re-verifies the full sha256. The root is a local
directory or any fsspec URL (``memory://``, ``s3://``, ...), so several processes and
nodes can share one store without rewriting refs.

    >>> store = ImageStore("memory://demo")
    >>> stored = store.put_bytes(png_bytes, "image/png")          # doctest: +SKIP
    >>> store.read(stored.asset, stored.sha256) == png_bytes      # doctest: +SKIP
    True

Putting only reads the image header (its size), never decodes pixels: a 1080p PNG costs
one sha256 and one write. Every check runs before the write (limits, media type, a size
no layout family can place, and the caller's own ``accept``, e.g. one spec's layout
math), so a refused image leaves nothing in the store.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import os
import re
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from mmref.renderers.errors import (
    AssetNotFoundError,
    IntegrityError,
    InvalidImageError,
    LayoutError,
    PathEscapeError,
    RefError,
    StoreWriteError,
)
from mmref.renderers.layout import check_size
from mmref.renderers.refs import EXTENSIONS, RawImageRef, asset_name, check_asset

_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,(.*)", re.DOTALL)
# A caller's check of an image's (width, height), run before the write; raising refuses it.
Accept = Callable[[int, int], object]
_PIL_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass(frozen=True)
class StoreLimits:
    """Refusal thresholds, checked before anything is written.

    | field          | default  | guards against                         |
    |----------------|----------|----------------------------------------|
    | max_bytes      | 32 MiB   | oversized uploads                      |
    | max_pixels     | 64 Mpx   | decompression bombs (header dims)      |
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 8192 * 8192


@dataclass(frozen=True)
class StoredImage:
    """What a ref needs to know about bytes the store holds."""

    asset: str
    sha256: str
    media_type: str
    width: int
    height: int
    nbytes: int
    deduplicated: bool = False


def sniff_media_type(data: bytes) -> str | None:
    """Media type from magic bytes, or None when the bytes are no supported image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def decode_data_url(url: str, max_bytes: int) -> tuple[bytes, str]:
    """Strictly decode ``data:image/<type>;base64,<payload>`` into bytes and declared type.

    Error messages never echo the payload.
    """
    if not isinstance(url, str):
        raise InvalidImageError(f"image URL must be a string, got {type(url).__name__}")
    match = _DATA_URL.fullmatch(url)
    if match is None:
        header, comma, _ = url.partition(",")
        # Echo the header only where a comma ends it early: past that point it may be payload.
        shown = f"header {header!r}" if comma and len(header) <= 48 else f"{len(url)} chars without a short header"
        raise InvalidImageError(f"expected a 'data:image/<type>;base64,...' URL, got {shown}")
    media_type, payload = match.group(1).lower(), match.group(2)
    if media_type == "image/jpg":
        media_type = "image/jpeg"
    if media_type not in EXTENSIONS:
        raise InvalidImageError(f"unsupported media type {media_type!r}; supported: {sorted(EXTENSIONS)}")
    if len(payload) * 3 // 4 > max_bytes:
        raise InvalidImageError(f"data URL of ~{len(payload) * 3 // 4} bytes exceeds the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(
            f"data URL payload ({len(payload)} chars, {media_type}) is not strict base64"
        ) from None
    return data, media_type


def inspect_image(data: bytes, declared: str, limits: StoreLimits, name: str) -> tuple[int, int]:
    """Check bytes against the declared type and limits; return (width, height) from the header."""
    if len(data) > limits.max_bytes:
        raise InvalidImageError(f"{name}: {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    sniffed = sniff_media_type(data)
    if sniffed is None:
        raise InvalidImageError(f"{name}: bytes are not a PNG, JPEG, WebP or GIF image (declared {declared})")
    if sniffed != declared:
        raise InvalidImageError(f"{name}: declared media type {declared} but the bytes are {sniffed}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                fmt = image.format
    except Image.DecompressionBombError:
        raise InvalidImageError(
            f"{name}: image dimensions exceed PIL's decompression-bomb guard (limit here {limits.max_pixels} pixels)"
        ) from None
    except Exception as exc:  # PIL raises many types for corrupt headers
        raise InvalidImageError(f"{name}: corrupt {declared} header ({type(exc).__name__}: {exc})") from None
    if _PIL_FORMATS.get(fmt or "") != declared:
        raise InvalidImageError(f"{name}: PIL reads format {fmt} but the bytes were declared {declared}")
    if width <= 0 or height <= 0 or width * height > limits.max_pixels:
        raise InvalidImageError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels} "
            "(decompression bomb guard; raise StoreLimits.max_pixels if intended)"
        )
    return width, height


class ImageStore:
    """Write-once store of encoded image bytes, addressed by content."""

    def __init__(self, root: str | os.PathLike[str], limits: StoreLimits | None = None) -> None:
        self.url = os.fspath(root)
        self.limits = limits or StoreLimits()
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
            self.root = os.path.realpath(self.root)
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ImageStore({self.url!r})"

    def put_bytes(self, data: bytes, media_type: str, accept: Accept | None = None) -> StoredImage:
        """Store encoded image bytes (atomic, idempotent) and return what a ref needs.

        ``accept(width, height)`` (sizes from the header) runs after the store's own checks
        and before the write; whatever it raises propagates and nothing is written.
        """
        if media_type not in EXTENSIONS:
            raise InvalidImageError(f"unsupported media type {media_type!r}; supported: {sorted(EXTENSIONS)}")
        sha256 = hashlib.sha256(data).hexdigest()
        asset = asset_name(sha256, media_type)
        width, height = inspect_image(data, media_type, self.limits, f"asset {asset}")
        try:
            check_size(width, height)  # e.g. aspect ratio over 200: no family places it, so never store it
        except LayoutError as exc:
            raise LayoutError(f"asset {asset}: {exc}") from None
        if accept is not None:
            accept(width, height)
        exists = self._exists(asset)
        if not exists:
            try:
                self._write_atomic(asset, data)
            except OSError as exc:
                raise StoreWriteError(f"could not write asset {asset} ({len(data)} bytes) to store {self.url}: "
                                      f"{exc}") from exc
        return StoredImage(asset, sha256, media_type, width, height, len(data), deduplicated=exists)

    def put_image(self, image: Image.Image, format: str = "PNG", accept: Accept | None = None) -> StoredImage:
        """Encode a PIL image (PNG by default, lossless) and store it (``accept`` as in ``put_bytes``)."""
        if accept is not None:
            accept(*image.size)  # refuse before spending an encode
        buffer = io.BytesIO()
        image.save(buffer, format)
        return self.put_bytes(buffer.getvalue(), _PIL_FORMATS[format.upper()], accept)

    def put_data_url(self, url: str, accept: Accept | None = None) -> StoredImage:
        """Store the image inside a ``data:image/...;base64,`` URL (``accept`` as in ``put_bytes``)."""
        data, media_type = decode_data_url(url, self.limits.max_bytes)
        return self.put_bytes(data, media_type, accept)

    def read(self, ref_or_asset: RawImageRef | str, sha256: str | None = None) -> bytes:
        """Bytes of an asset, verified against its sha256 (taken from the ref when given one)."""
        if isinstance(ref_or_asset, RawImageRef):
            asset, sha256 = ref_or_asset.asset, ref_or_asset.sha256
        else:
            asset = ref_or_asset
        if sha256 is None:
            raise TypeError("read(asset) needs the expected sha256; pass a ref or sha256=")
        path = self.resolve(asset)
        try:
            data = self._read_path(path)
        except FileNotFoundError:
            raise AssetNotFoundError(f"asset {asset} (sha256 {sha256[:16]}…) is not in store {self.url}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise IntegrityError(
                f"asset {asset} in store {self.url} is corrupt or tampered: expected sha256 {sha256}, got {actual}"
            )
        return data

    def exists(self, asset: str) -> bool:
        """True when the asset is present (not verified)."""
        return self._exists(asset)

    def resolve(self, asset: str) -> str:
        """Path of an asset under the root; refuses ids and symlinks that escape it."""
        try:
            check_asset(asset)
        except RefError as exc:
            raise PathEscapeError(f"store {self.url}: {exc}") from None
        if not self.is_local:
            return f"{self.root.rstrip('/')}/{asset}"
        path = os.path.join(self.root, asset)
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.root]) != self.root:
            raise PathEscapeError(f"asset {asset} resolves to {real!r}, outside store root {self.root!r}")
        return real

    def _exists(self, asset: str) -> bool:
        path = self.resolve(asset)
        return os.path.exists(path) if self.is_local else self.fs.exists(path)

    def _read_path(self, path: str) -> bytes:
        if self.is_local:
            with open(path, "rb") as f:
                return f.read()
        return self.fs.cat_file(path)

    def _write_atomic(self, asset: str, data: bytes) -> None:
        # Temp name + rename: readers never see a partial file, and concurrent writers of
        # the same bytes each rename a complete copy over the other (identical content).
        path = self.resolve(asset)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        if self.is_local:
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                _remove_quietly(tmp)
                raise
        else:
            try:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            except BaseException:
                if self.fs.exists(tmp):
                    self.fs.rm_file(tmp)
                raise

    def stats(self) -> dict[str, Any]:
        """Count and total bytes of stored assets (walks the root)."""
        names = [n for n in self.fs.ls(self.root, detail=True) if not n["name"].split("/")[-1].count(".tmp-")]
        return {"assets": len(names), "bytes": sum(int(n.get("size") or 0) for n in names)}


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
