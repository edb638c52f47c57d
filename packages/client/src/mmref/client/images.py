"""Images in request bodies become store refs before anything else sees them.

``prepare_images(body, store, spec)`` walks dicts, lists and tuples and rewrites every image
part, OpenAI ``{"type": "image_url", "image_url": {"url": ...}}`` and HF
``{"type": "image", "image": ...}`` alike, into the canonical form::

    {"type": "image_url", "image_url": {"url": "mmref:v1:..."}}

It accepts ``data:image/...;base64,`` URLs, PIL images and refs already in the store (so it
is idempotent), and, given an ``image_root``, paths (``str`` or ``Path``) relative to it. It
refuses, with ``ImageInputError``: http(s) and file URLs (never fetched), paths without a
root or leaving it, malformed base64, unsupported media types, oversized images, and
image parts without a proper ``image_url`` object, and sizes the layout cannot place
(aspect ratio over 200): every refusal happens before the store write, so a refused
image leaves nothing in the store. Messages never echo the payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmref.client.errors import ImageInputError
from mmref.renderers.contract import make_ref, verify_ref
from mmref.renderers.errors import MMRefError
from mmref.renderers.layout import LayoutSpec, describe_image
from mmref.renderers.refs import is_ref_string, parse_ref
from mmref.renderers.store import ImageStore, StoredImage, sniff_media_type


@dataclass
class PrepareStats:
    """What one ``prepare_images`` call did."""

    images: int = 0          # image parts seen
    written: int = 0         # new assets written to the store
    dedup_hits: int = 0      # images whose bytes were already stored
    already_refs: int = 0    # parts that were refs already
    bytes: int = 0           # encoded bytes of the images seen (not counting refs)


def prepare_images(body: Any, store: ImageStore, spec: LayoutSpec,
                   image_root: str | Path | None = None) -> tuple[Any, PrepareStats]:
    """A copy of ``body`` with every image part as a canonical ref part, and what was done.

    ``image_root``: the directory that relative image paths are read from (an environment's
    dataset); without one, paths are refused.
    """
    stats = PrepareStats()
    root = Path(image_root) if image_root is not None else None
    return _walk(body, _Target(store, spec, stats, root), "$"), stats


@dataclass(frozen=True)
class _Target:
    """Where one ``prepare_images`` call puts images, and what it counts."""

    store: ImageStore
    spec: LayoutSpec
    stats: PrepareStats
    root: Path | None


def _walk(node: Any, to: _Target, path: str) -> Any:
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "image_url" or (kind is None and "image_url" in node):
            return _image_url_part(node, to, path)
        if kind in ("image", "input_image"):
            return _canonical(_source(node.get("image", node.get("image_url")), to, path))
        return {k: _walk(v, to, f"{path}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, to, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, tuple):
        return tuple(_walk(v, to, f"{path}[{i}]") for i, v in enumerate(node))
    return node


def _image_url_part(part: dict, to: _Target, path: str) -> dict:
    image_url = part.get("image_url")
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), (str, Path)):
        raise ImageInputError(f"{path}: image_url part needs an object {{'url': ...}}, got "
                              f"{type(image_url).__name__ if image_url is not None else 'nothing'}")
    return _canonical(_source(image_url["url"], to, path))


def _canonical(ref_string: str) -> dict:
    return {"type": "image_url", "image_url": {"url": ref_string}}


def _source(source: Any, to: _Target, path: str) -> str:
    """The ref string of one image source (data URL, PIL image, existing ref, or path under the root)."""
    store, spec, stats = to.store, to.spec, to.stats
    stats.images += 1

    def placeable(width: int, height: int) -> None:  # the layout's refusals, before anything is written
        describe_image(spec, width, height)

    try:
        if isinstance(source, Image.Image):
            return _stored(store.put_image(source, accept=placeable), spec, stats)
        if isinstance(source, Path):
            return _stored(_put_file(source, to, placeable, path), spec, stats)
        if not isinstance(source, str):
            raise ImageInputError(f"{path}: image must be a data URL, a PIL image or an mmref ref (or a path under "
                                  f"the environment's image_root), got {type(source).__name__}")
        if is_ref_string(source):
            ref = parse_ref(source)
            verify_ref(ref, spec, stage="client")
            if not store.exists(ref.asset):
                raise ImageInputError(f"{path}: ref {ref.describe()} is not in store {store.url}")
            stats.already_refs += 1
            return source
        scheme = source.split(":", 1)[0].lower() if ":" in source[:12] else ""
        if scheme in ("http", "https", "file", "ftp", "s3", "gs"):
            raise ImageInputError(f"{path}: {scheme} image URLs are never fetched; send the image as a "
                                  "data:image/...;base64 URL")
        if scheme == "" and to.root is not None:
            return _stored(_put_file(source, to, placeable, path), spec, stats)
        if scheme != "data":
            raise ImageInputError(f"{path}: image looks like a local path or unknown scheme; send a "
                                  "data:image/...;base64 URL (or name an image_root for paths)")
        return _stored(store.put_data_url(source, accept=placeable), spec, stats)
    except ImageInputError:
        raise
    except MMRefError as exc:
        raise ImageInputError(f"{path}: {exc}") from None


def _put_file(name: str | Path, to: _Target, accept: Any, path: str) -> StoredImage:
    """Read an image file under ``to.root`` (never outside it) into the store."""
    if to.root is None:
        raise ImageInputError(f"{path}: image path {str(name)!r} needs an image_root to be read from")
    root = to.root.resolve()
    file = (root / name).resolve()
    if not file.is_relative_to(root):
        raise ImageInputError(f"{path}: image path {str(name)!r} leaves the image root {to.root}")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ImageInputError(f"{path}: cannot read image {str(name)!r} under {to.root}: "
                              f"{exc.strerror or type(exc).__name__}") from None
    media_type = sniff_media_type(data)
    if media_type is None:
        raise ImageInputError(f"{path}: {str(name)!r} under {to.root} is no PNG, JPEG, GIF or WebP image")
    return to.store.put_bytes(data, media_type, accept)


def _stored(stored, spec: LayoutSpec, stats: PrepareStats) -> str:
    stats.bytes += stored.nbytes
    if stored.deduplicated:
        stats.dedup_hits += 1
    else:
        stats.written += 1
    return make_ref(spec, stored).encode()
