"""One image's pixel tensors from its ref: read, verify, decode, process, check.

The inference server's feature cache and the trainer's materializer both make an entry
from the bytes alone (``stored_image_ref``: the ref the stored bytes make under the stage's
spec) and hold every requesting ref to it (``verify_ref_against_image``) on each lookup,
hit or miss; nothing else in mmref turns bytes into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from mmref.renderers.contract import make_ref
from mmref.renderers.decode import decode_rgb
from mmref.renderers.errors import ContractMismatchError, InvalidImageError
from mmref.renderers.layout import LayoutSpec
from mmref.renderers.refs import RawImageRef, asset_name
from mmref.renderers.store import ImageStore, StoredImage, inspect_image, sniff_media_type


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


@dataclass(frozen=True)
class StoredEntry:
    """What a cache keeps per stored image: the ref its bytes make, and what was computed from them.

    Every requesting ref is held to ``actual`` (``verify_ref_against_image``) on each lookup.
    """

    actual: RawImageRef
    value: ImageFeatures | DecodedImage

    @property
    def nbytes(self) -> int:
        return self.value.nbytes


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


def stored_image_ref(store: ImageStore, spec: LayoutSpec, asset: str, sha256: str) -> tuple[RawImageRef, bytes]:
    """The ref the stored bytes of ``asset`` make under ``spec``, and the bytes (hash-verified)."""
    data = store.read(asset, sha256)
    media_type = sniff_media_type(data)
    if media_type is None:
        raise InvalidImageError(f"asset {asset} (sha256 {sha256[:16]}…) in store {store.url} holds no PNG, JPEG, "
                                "WebP or GIF image")
    width, height = inspect_image(data, media_type, store.limits, f"asset {asset}")
    facts = StoredImage(asset_name(sha256, media_type), sha256, media_type, width, height, len(data))
    return make_ref(spec, facts), data
