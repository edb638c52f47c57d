"""Making refs from stored images, and checking received refs against a consumer's spec.

Producer side: ``make_ref(spec, stored)`` combines the store's facts about the bytes with
the layout math. Consumer side: ``verify_ref(ref, spec, stage=...)`` recomputes family,
fingerprint, grid and token count from *its own* spec and raises
``ContractMismatchError`` naming the image, the stage, and expected vs actual values.
"""

from __future__ import annotations

from typing import Protocol

from mmref.renderers.errors import ContractMismatchError
from mmref.renderers.layout import LayoutSpec, describe_image
from mmref.renderers.refs import CONTRACT_VERSION, RawImageRef


class ImageFacts(Protocol):
    """What the store knows about some bytes (``StoredImage`` satisfies this)."""

    asset: str
    sha256: str
    media_type: str
    width: int
    height: int


def make_ref(spec: LayoutSpec, stored: ImageFacts) -> RawImageRef:
    """The ref of a stored image under ``spec``'s layout."""
    layout = describe_image(spec, stored.width, stored.height)
    return RawImageRef(
        version=CONTRACT_VERSION, family=spec.family, fingerprint=spec.fingerprint, sha256=stored.sha256,
        asset=stored.asset, media_type=stored.media_type, width=stored.width, height=stored.height,
        grid_thw=layout.grid_thw, num_tokens=layout.num_tokens,
    )


def verify_ref(ref: RawImageRef, spec: LayoutSpec, stage: str) -> None:
    """Raise ``ContractMismatchError`` if ``ref`` was not made under ``spec``."""
    where = f"{stage}: image {ref.describe()}"
    if ref.family != spec.family:
        raise ContractMismatchError(f"{where}: ref family {ref.family!r} but this {stage} serves {spec.family!r}")
    if ref.fingerprint != spec.fingerprint:
        raise ContractMismatchError(
            f"{where}: layout fingerprint {ref.fingerprint[:16]}… != {spec.fingerprint[:16]}… of this {stage}'s "
            f"processor (min_pixels={spec.min_pixels}, max_pixels={spec.max_pixels}, patch={spec.patch_size}); "
            "the renderer and this stage use different resize parameters"
        )
    layout = describe_image(spec, ref.width, ref.height)
    if tuple(ref.grid_thw) != layout.grid_thw:
        raise ContractMismatchError(f"{where}: ref grid_thw {tuple(ref.grid_thw)} != recomputed {layout.grid_thw}")
    if ref.num_tokens != layout.num_tokens:
        raise ContractMismatchError(f"{where}: ref num_tokens {ref.num_tokens} != recomputed {layout.num_tokens}")
