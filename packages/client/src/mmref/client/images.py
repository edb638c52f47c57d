"""Images in request bodies become store refs before anything else sees them.

``prepare_images(body, store, spec)`` walks dicts, lists and tuples and rewrites every image
part, OpenAI ``{"type": "image_url", "image_url": {"url": ...}}`` and HF
``{"type": "image", "image": ...}`` alike, into the canonical form::

    {"type": "image_url", "image_url": {"url": "mmref:v1:..."}}

It accepts ``data:image/...;base64,`` URLs, PIL images and refs already in the store (so it
is idempotent). It refuses, with ``ImageInputError``: http(s) and file URLs (never
fetched), local paths, malformed base64, unsupported media types, oversized images, and
image parts without a proper ``image_url`` object, and sizes the layout cannot place
(aspect ratio over 200): every refusal happens before the store write, so a refused
image leaves nothing in the store. Messages never echo the payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from mmref.client.errors import ImageInputError
from mmref.renderers.contract import make_ref, verify_ref
from mmref.renderers.errors import MMRefError
from mmref.renderers.layout import LayoutSpec, describe_image
from mmref.renderers.refs import is_ref_string, parse_ref
from mmref.renderers.store import ImageStore


@dataclass
class PrepareStats:
    """What one ``prepare_images`` call did."""

    images: int = 0          # image parts seen
    written: int = 0         # new assets written to the store
    dedup_hits: int = 0      # images whose bytes were already stored
    already_refs: int = 0    # parts that were refs already
    bytes: int = 0           # encoded bytes of the images seen (not counting refs)


def prepare_images(body: Any, store: ImageStore, spec: LayoutSpec) -> tuple[Any, PrepareStats]:
    """A copy of ``body`` with every image part as a canonical ref part, and what was done."""
    stats = PrepareStats()
    return _walk(body, store, spec, stats, "$"), stats


def _walk(node: Any, store: ImageStore, spec: LayoutSpec, stats: PrepareStats, path: str) -> Any:
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "image_url" or (kind is None and "image_url" in node):
            return _image_url_part(node, store, spec, stats, path)
        if kind in ("image", "input_image"):
            return _canonical(_source(node.get("image", node.get("image_url")), store, spec, stats, path))
        return {k: _walk(v, store, spec, stats, f"{path}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, store, spec, stats, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, tuple):
        return tuple(_walk(v, store, spec, stats, f"{path}[{i}]") for i, v in enumerate(node))
    return node


def _image_url_part(part: dict, store: ImageStore, spec: LayoutSpec, stats: PrepareStats, path: str) -> dict:
    image_url = part.get("image_url")
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise ImageInputError(f"{path}: image_url part needs an object {{'url': ...}}, got "
                              f"{type(image_url).__name__ if image_url is not None else 'nothing'}")
    return _canonical(_source(image_url["url"], store, spec, stats, path))


def _canonical(ref_string: str) -> dict:
    return {"type": "image_url", "image_url": {"url": ref_string}}


def _source(source: Any, store: ImageStore, spec: LayoutSpec, stats: PrepareStats, path: str) -> str:
    """The ref string of one image source (data URL, PIL image or existing ref)."""
    stats.images += 1

    def placeable(width: int, height: int) -> None:  # the layout's refusals, before anything is written
        describe_image(spec, width, height)

    try:
        if isinstance(source, Image.Image):
            return _stored(store.put_image(source, accept=placeable), spec, stats)
        if not isinstance(source, str):
            raise ImageInputError(f"{path}: image must be a data URL, a PIL image or an mmref ref, got "
                                  f"{type(source).__name__}")
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
        if scheme != "data":
            raise ImageInputError(f"{path}: image looks like a local path or unknown scheme; send a "
                                  "data:image/...;base64 URL")
        return _stored(store.put_data_url(source, accept=placeable), spec, stats)
    except ImageInputError:
        raise
    except MMRefError as exc:
        raise ImageInputError(f"{path}: {exc}") from None


def _stored(stored, spec: LayoutSpec, stats: PrepareStats) -> str:
    stats.bytes += stored.nbytes
    if stored.deduplicated:
        stats.dedup_hits += 1
    else:
        stats.written += 1
    return make_ref(spec, stored).encode()
