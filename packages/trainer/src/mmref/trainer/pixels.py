"""One image's pixel tensors from its ref: read, verify, decode, process, check.

The inference server's feature cache and the trainer's materializer both make an entry
from the bytes alone (``stored_image_ref``: the ref the stored bytes make under the stage's
spec) and hold every requesting ref to it (``verify_ref_against_image``) on each lookup,
hit or miss; nothing else in mmref turns bytes into pixels.

Both sides feed their processor the same image: ``processor_sized`` resizes it, with the
processor's own PIL resample, to the size the layout math gives (the ref's grid times the
patch size). Whatever processor then sees it has nothing left to resize and only rescales,
normalizes and patchifies: the trainer's PIL processor, and vLLM's torchvision one, whose own
resize (torch ``interpolate``) differs from PIL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmref.renderers.contract import make_ref
from mmref.renderers.decode import decode_rgb
from mmref.renderers.errors import ContractMismatchError, InvalidImageError
from mmref.renderers.layout import LayoutSpec, smart_resize
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


def processor_size(grid_thw: tuple[int, int, int], processor: Any) -> tuple[int, int] | None:
    """(width, height) an image of ``grid_thw`` is resized to by ``processor``, if its resize keeps that size.

    ``grid * patch_size`` per side; None where that size is not a fixed point of the processor's
    ``smart_resize`` (thin images whose short side was raised to one merged patch, putting them
    just past ``max_pixels``): a processor would resize such an image again. None for processors
    without ``smart_resize`` pixel limits (Kimi's resize-then-pad): the grid includes padding.
    """
    if processor.size["shortest_edge"] is None:
        return None
    _, grid_h, grid_w = grid_thw
    height, width = grid_h * processor.patch_size, grid_w * processor.patch_size
    again = smart_resize(height, width, processor.patch_size * processor.merge_size,
                         processor.size["shortest_edge"], processor.size["longest_edge"])
    return (width, height) if again == (height, width) else None


def processor_sized(image: Image.Image, grid_thw: tuple[int, int, int], processor: Any) -> Image.Image:
    """``image`` resized as the image processor resizes it (``processor_size``), so its own resize has nothing to do.

    The same call the PIL processor makes (``Image.resize`` with its ``resample``), so the
    processor's pixels are unchanged; then ``smart_resize`` keeps the size, and PIL and torchvision
    return a same-size resize as it was. Where ``processor_size`` is None, ``image`` as it is.
    """
    size = processor_size(grid_thw, processor)
    return image if size is None or image.size == size else image.resize(size, resample=processor.resample)


def decoded_image(data: bytes, ref: RawImageRef, processor: Any) -> DecodedImage:
    """Decode verified bytes (size checked against the ref), sized for ``processor`` (``processor_sized``)."""
    return DecodedImage(processor_sized(decode_rgb(data, ref), tuple(ref.grid_thw), processor), tuple(ref.grid_thw))


def process_pixels(data: bytes, ref: RawImageRef, processor: Any, stage: str) -> ImageFeatures:
    """Decode verified bytes, size them (``processor_sized``) and run the image processor; check the grid."""
    image = processor_sized(decode_rgb(data, ref), tuple(ref.grid_thw), processor)
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
