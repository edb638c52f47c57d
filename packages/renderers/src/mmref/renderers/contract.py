"""Making refs from stored images, and checking received refs against a consumer's spec.

Producer side: ``make_ref(spec, stored)`` combines the store's facts about the bytes with
the layout math. Consumer side: ``verify_ref(ref, spec, stage=...)`` recomputes family,
fingerprint, grid and token count from *its own* spec and raises
``ContractMismatchError`` naming the image, the stage, and expected vs actual values.
Once the bytes have been read, ``verify_ref_against_image(ref, actual, spec, stage=...)``
also holds the ref to ``actual``, the ref those bytes make under ``spec`` (size and media
type from the header, sha256 from the content), so an edited width is caught even when
it keeps the grid.

A fingerprint drift names the parameters that differ, with the ref's value and this
stage's, whenever the producer's spec is known here (a published default, or any spec
computed in this process; see ``layout.spec_for_fingerprint``)::

    trainer: layout drift for image asset=… sha256=…: merge_size 2 (ref) != 1 (this trainer); …
"""

from __future__ import annotations

from typing import Any, Protocol

from mmref.renderers.errors import ContractMismatchError
from mmref.renderers.layout import LayoutSpec, describe_image, spec_differences, spec_for_fingerprint
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
        raise ContractMismatchError(drift_message(ref, spec, stage))
    layout = describe_image(spec, ref.width, ref.height)
    if tuple(ref.grid_thw) != layout.grid_thw:
        raise ContractMismatchError(f"{where}: ref grid_thw {tuple(ref.grid_thw)} != recomputed {layout.grid_thw}")
    if ref.num_tokens != layout.num_tokens:
        raise ContractMismatchError(f"{where}: ref num_tokens {ref.num_tokens} != recomputed {layout.num_tokens}")


def verify_ref_against_image(ref: RawImageRef, actual: RawImageRef, spec: LayoutSpec, stage: str) -> None:
    """Raise ``ContractMismatchError`` unless ``ref`` passes ``verify_ref`` and equals ``actual`` field by field.

    ``actual`` is ``make_ref(spec, facts)`` of the image's stored bytes. A cache calls this
    on every lookup, hit or miss, so a warm cache answers exactly as a cold one.
    """
    verify_ref(ref, spec, stage)
    differing = [(name, getattr(ref, name), getattr(actual, name)) for name in type(ref).model_fields
                 if getattr(ref, name) != getattr(actual, name)]
    if differing:
        changed = "; ".join(f"{name} {_show(theirs)} (ref) != {_show(ours)} (stored image)"
                            for name, theirs, ours in differing)
        raise ContractMismatchError(f"{stage}: image {ref.describe()}: the ref does not describe its stored image: "
                                    f"{changed}; the ref was edited or made from other bytes")


def drift_message(ref: RawImageRef, spec: LayoutSpec, stage: str) -> str:
    """Why ``ref``'s layout fingerprint differs from ``spec``'s: each changed parameter with both values.

    Names the parameters when the producer's spec is known in this process, else gives both
    fingerprints and this stage's parameters to compare with the producer's processor config.
    """
    head, here = f"{stage}: layout drift for image {ref.describe()}", f"this {stage}"
    producer = spec_for_fingerprint(ref.fingerprint)
    if producer is None:
        return (f"{head}: layout fingerprint {ref.fingerprint} (ref) != {spec.fingerprint} ({here}); the producer's "
                f"layout parameters are unknown to this process; compare the processor configs ({here}: "
                f"{_params(spec)})")
    changed = "; ".join(f"{name} {_show(theirs)} (ref) != {_show(ours)} ({here})"
                        for name, theirs, ours in spec_differences(producer, spec))
    return (f"{head}: {changed} (layout fingerprint {ref.fingerprint[:16]}… != {spec.fingerprint[:16]}…); render "
            f"with the processor config this {stage} uses, or serve the one the ref was made with")


def _params(spec: LayoutSpec) -> str:
    names = ("resize", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
    names += ("in_patch_limit", "patch_limit_on_one_side") if spec.resize == "navit" else ("min_pixels", "max_pixels")
    return ", ".join(f"{name}={_show(getattr(spec, name))}" for name in names)


def _show(value: Any) -> str:
    return str(value)  # floats in full (repr): mean/std drift can sit in the 8th digit
