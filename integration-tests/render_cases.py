"""Shared builders for render tests: images as refs (ours) and as PIL images (transformers')."""

from __future__ import annotations

from PIL import Image

from mmref.renderers import ImageStore, layout_spec, make_ref

SIZES = [(64, 64), (120, 80), (33, 150), (200, 140), (96, 40), (57, 57)]


def picture(index: int) -> Image.Image:
    width, height = SIZES[index % len(SIZES)]
    return Image.new("RGB", (width, height), ((40 * index) % 256, 100, 200 - index))


def image_ref(store: ImageStore, family: str, index: int, spec=None) -> str:
    return make_ref(spec or layout_spec(family), store.put_image(picture(index))).encode()


def part(store: ImageStore, family: str, index: int) -> dict:
    return {"type": "image_url", "image_url": {"url": image_ref(store, family, index)}}


