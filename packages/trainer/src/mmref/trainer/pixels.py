"""One image's pixel tensors from its ref: read, verify, decode, process, check.

The inference server's feature cache and the trainer's materializer both call
``image_features``; nothing else in mmref turns bytes into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from mmref.renderers.contract import verify_ref
from mmref.renderers.decode import decode_rgb
from mmref.renderers.errors import ContractMismatchError
from mmref.renderers.layout import LayoutSpec
from mmref.renderers.refs import RawImageRef
from mmref.renderers.store import ImageStore


@dataclass(frozen=True)
class ImageFeatures:
    """Processed pixels of one image.

    pixel_values: (grid_t * grid_h * grid_w, C * temporal_patch * patch * patch), float32
    grid_thw:     (t, h, w) in patches
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


@dataclass(frozen=True)
class DecodedImage:
    """A hash-verified, decoded image, for engines that process pixels themselves (vLLM)."""

    image: Image.Image
    grid_thw: tuple[int, int, int]  # the ref's, checked against layout math by ``verify_ref``

    @property
    def nbytes(self) -> int:
        return self.image.width * self.image.height * len(self.image.getbands())


def decoded_image(data: bytes, ref: RawImageRef) -> DecodedImage:
    """Decode verified bytes (size checked against the ref)."""
    return DecodedImage(decode_rgb(data, ref), tuple(ref.grid_thw))


def process_pixels(data: bytes, ref: RawImageRef, processor, stage: str) -> ImageFeatures:
    """Decode verified bytes and run the image processor; check the grid against the ref."""
    image = decode_rgb(data, ref)
    out = processor(images=[image], return_tensors="pt")
    grid = tuple(int(x) for x in out["image_grid_thw"][0].tolist())
    if grid != tuple(ref.grid_thw):
        raise ContractMismatchError(f"{stage}: image {ref.describe()}: processor grid {grid} != ref grid_thw {ref.grid_thw}")
    return ImageFeatures(pixel_values=out["pixel_values"], grid_thw=grid)


def image_features(store: ImageStore, ref: RawImageRef, spec: LayoutSpec, processor, stage: str) -> ImageFeatures:
    """Check the ref against ``spec``, read and hash-verify its bytes, decode and process them."""
    verify_ref(ref, spec, stage)
    return process_pixels(store.read(ref), ref, processor, stage)
