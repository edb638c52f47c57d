"""Decoding stored image bytes into RGB pixels, with typed errors.

Only the processes that feed a model call this (the inference server, the trainer's
materializer, processed mode); raw rendering never does.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from mmref.renderers.errors import InvalidImageError
from mmref.renderers.refs import RawImageRef
from mmref.renderers.store import StoreLimits


def decode_rgb(data: bytes, ref: RawImageRef, limits: StoreLimits | None = None) -> Image.Image:
    """Fully decode ``data`` to an RGB image and check it against the ref's size.

    Raises ``InvalidImageError`` naming the asset for truncated or corrupt files, images
    over the pixel limit, and images whose decoded size differs from the ref's.
    """
    limits = limits or StoreLimits()
    if ref.width * ref.height > limits.max_pixels:
        raise InvalidImageError(f"{ref.describe()}: {ref.width}x{ref.height} exceeds {limits.max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                rgb = image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise InvalidImageError(f"{ref.describe()}: cannot decode {ref.media_type} ({type(exc).__name__}: {exc})") from None
    if rgb.size != (ref.width, ref.height):
        raise InvalidImageError(
            f"{ref.describe()}: decoded size {rgb.size[0]}x{rgb.size[1]} != ref size {ref.width}x{ref.height}"
        )
    return rgb
