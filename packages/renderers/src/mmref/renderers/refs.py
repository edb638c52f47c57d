"""The versioned image-ref contract shared by every mmref stage.

A ref names an image by the sha256 of its encoded bytes and carries the layout the
producer computed for it, so each consumer can re-check that layout against its own
configuration before any pixels exist. A ref never holds pixels.

    >>> ref = RawImageRef(family="qwen2-vl", fingerprint="ab" * 32, sha256="cd" * 32,
    ...     asset="cdcdcdcdcdcdcdcd.png", media_type="image/png", width=64, height=48,
    ...     grid_thw=(1, 4, 4), num_tokens=4)
    >>> parse_ref(ref.encode()) == ref
    True
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_serializer, field_validator, model_validator

from mmref.renderers.errors import RefError, SlotError

CONTRACT_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
REF_PREFIX = "mmref:"

Family = Literal["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "kimi-k2.5"]
FAMILIES: tuple[str, ...] = Family.__args__  # type: ignore[attr-defined]
MediaType = Literal["image/png", "image/jpeg", "image/webp", "image/gif"]
EXTENSIONS: dict[str, str] = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
PIXEL_KEYS = frozenset({"pixel_values", "image_embeds", "image_features"})

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ASSET = re.compile(r"[0-9a-f]{16}\.(png|jpg|webp|gif)")
_HEADER = re.compile(r"mmref:v(\d+):(.*)", re.DOTALL)


def asset_name(sha256: str, media_type: str) -> str:
    """Store-relative asset id of an image: ``<sha256[:16]>.<ext>``."""
    return f"{sha256[:16]}.{EXTENSIONS[media_type]}"


def check_asset(asset: str) -> str:
    """Return ``asset`` if it is a safe store-relative id, else raise ``RefError``."""
    if not isinstance(asset, str) or not asset:
        raise RefError(f"asset must be a non-empty string, got {asset!r}")
    if asset.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", asset):
        raise RefError(f"asset {asset!r} is an absolute path; expected a store-relative id '<sha256[:16]>.<ext>'")
    if ".." in asset:
        raise RefError(f"asset {asset!r} contains '..'; expected a store-relative id '<sha256[:16]>.<ext>'")
    if "/" in asset or "\\" in asset or "%" in asset:
        raise RefError(f"asset {asset!r} contains a path separator or escape; expected '<sha256[:16]>.<ext>'")
    if not _ASSET.fullmatch(asset):
        raise RefError(f"asset {asset!r} does not match '<16 hex digits>.(png|jpg|webp|gif)'")
    return asset


def find_pixel_keys(payload: Any, path: str = "$") -> Iterator[str]:
    """Yield the JSON path of every pixel-carrying key at any depth of ``payload``."""
    if isinstance(payload, dict):
        for key, value in payload.items():
            here = f"{path}.{key}"
            if key in PIXEL_KEYS:
                yield here
            yield from find_pixel_keys(value, here)
    elif isinstance(payload, (list, tuple)):
        for i, value in enumerate(payload):
            yield from find_pixel_keys(value, f"{path}[{i}]")


def reject_pixel_payload(payload: Any, where: str = "payload") -> None:
    """Raise ``RefError`` if ``payload`` carries processed pixels anywhere."""
    found = list(find_pixel_keys(payload))
    if found:
        raise RefError(
            f"{where} carries processed image data at {', '.join(found)}; mmref moves images as refs "
            f"only ({', '.join(sorted(PIXEL_KEYS))} are never accepted)"
        )


class RawImageRef(BaseModel):
    """A few hundred bytes that name one image and the layout its tokens were computed with."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = CONTRACT_VERSION
    family: Family
    fingerprint: str
    modality: Literal["image"] = "image"
    sha256: str
    asset: str
    media_type: MediaType
    width: int
    height: int
    grid_thw: tuple[int, int, int]
    num_tokens: int

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v not in SUPPORTED_VERSIONS:
            raise ValueError(f"unknown contract version {v}; this build understands {list(SUPPORTED_VERSIONS)}")
        return v

    @field_validator("fingerprint", "sha256")
    @classmethod
    def _hex64(cls, v: str) -> str:
        if not _HEX64.fullmatch(v):
            raise ValueError(f"{v!r} is not 64 lowercase hex digits")
        return v

    @field_validator("asset")
    @classmethod
    def _safe_asset(cls, v: str) -> str:
        return check_asset(v)

    @field_validator("width", "height", "num_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be positive, got {v}")
        return v

    @field_validator("grid_thw")
    @classmethod
    def _positive_grid(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) <= 0:
            raise ValueError(f"grid_thw must be three positive ints, got {v}")
        return v

    @model_validator(mode="after")
    def _asset_matches_content(self) -> RawImageRef:
        expected = asset_name(self.sha256, self.media_type)
        if self.asset != expected:
            raise ValueError(f"asset {self.asset!r} does not match sha256 and media type (expected {expected!r})")
        return self

    def encode(self) -> str:
        """The string form ``mmref:v<version>:<base64url(compact sorted JSON)>``."""
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return f"{REF_PREFIX}v{self.version}:{base64.urlsafe_b64encode(body.encode()).decode().rstrip('=')}"

    def describe(self) -> str:
        """Short human name for error messages: asset and sha256 prefix."""
        return f"asset={self.asset} sha256={self.sha256[:16]}…"


def encode_ref(ref: RawImageRef) -> str:
    """String form of ``ref``; see ``RawImageRef.encode``."""
    return ref.encode()


def is_ref_string(text: Any) -> bool:
    """True for anything that claims to be a ref (starts with ``mmref:``)."""
    return isinstance(text, str) and text.startswith(REF_PREFIX)


def parse_ref(text: Any) -> RawImageRef:
    """Parse the string form of a ref; every failure is a ``RefError`` that says what was wrong."""
    if not isinstance(text, str):
        raise RefError(f"a ref must be a string, got {type(text).__name__}")
    return _parse_ref_string(text)


@functools.lru_cache(maxsize=8192)
def _parse_ref_string(text: str) -> RawImageRef:
    # Refs are frozen, so a parsed ref can be shared; multi-turn rollouts re-parse the same refs.
    match = _HEADER.fullmatch(text)
    if match is None:
        raise RefError(f"not a ref: expected 'mmref:v<version>:<base64url>', got {text[:40]!r}")
    version = int(match.group(1))
    if version not in SUPPORTED_VERSIONS:
        raise RefError(f"unknown ref contract version v{version}; this build understands {list(SUPPORTED_VERSIONS)}")
    body = match.group(2)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", body):
        raise RefError("ref body is not base64url (allowed: A-Z a-z 0-9 - _, no padding)")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise RefError(f"ref body is not valid base64url: {exc}") from None
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RefError(f"ref body is not JSON: {exc}") from None
    return ref_from_payload(payload, header_version=version)


def ref_from_payload(payload: Any, header_version: int | None = None) -> RawImageRef:
    """Build a ref from its decoded JSON object, with the contract's checks."""
    if not isinstance(payload, dict):
        raise RefError(f"ref body must be a JSON object, got {type(payload).__name__}")
    reject_pixel_payload(payload, "ref")
    if header_version is not None and payload.get("version") != header_version:
        raise RefError(f"ref header says v{header_version} but its body says version={payload.get('version')!r}")
    if isinstance(payload.get("grid_thw"), list):
        payload = {**payload, "grid_thw": tuple(payload["grid_thw"])}
    try:
        return RawImageRef(**payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'ref'}: {e['msg']}" for e in exc.errors())
        raise RefError(f"invalid ref: {problems}") from None
    except TypeError as exc:  # non-string keys
        raise RefError(f"invalid ref: {exc}") from None


class ImageSlot(BaseModel):
    """Where one image's placeholder tokens sit in a token sequence.

    ``offset`` is the index of the first image-pad token and ``length`` the run of pads,
    always ``ref.num_tokens``. On the wire the ref travels in its string form::

        {"ref": "mmref:v1:...", "offset": 17, "length": 64}
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ref: RawImageRef
    offset: int
    length: int

    @field_validator("ref", mode="before")
    @classmethod
    def _parse_string(cls, v: Any) -> Any:
        return parse_ref(v) if isinstance(v, str) else v

    @field_serializer("ref")
    def _ref_string(self, ref: RawImageRef) -> str:
        return ref.encode()

    @model_validator(mode="after")
    def _length_matches(self) -> ImageSlot:
        if self.offset < 0:
            raise ValueError(f"slot offset must be >= 0, got {self.offset} ({self.ref.describe()})")
        if self.length != self.ref.num_tokens:
            raise ValueError(
                f"slot length {self.length} != ref.num_tokens {self.ref.num_tokens} ({self.ref.describe()})"
            )
        return self

    @property
    def end(self) -> int:
        """One past the last pad token of this slot."""
        return self.offset + self.length

    def shifted(self, delta: int) -> ImageSlot:
        """The same image moved by ``delta`` tokens (used when sequences are concatenated)."""
        return ImageSlot(ref=self.ref, offset=self.offset + delta, length=self.length)


def check_slots(token_ids: Sequence[int], slots: Sequence[ImageSlot], image_pad_id: int, *,
                sampled: Sequence[bool] | None = None, where: str = "sequence") -> None:
    """Raise ``SlotError`` unless ``slots`` are exactly the image-pad runs of ``token_ids``.

    The one home of the slot invariant; the trace, training samples, the inference server
    and every trainer rank call it. It holds when

    - slots are sorted and disjoint, and each lies inside the sequence;
    - each slot is one whole run of ``image_pad_id`` tokens of ``ref.num_tokens`` (a pad just
      before or after it would make the run longer: a shifted slot);
    - no image-pad token lies outside a slot;
    - no slot covers a sampled token (``sampled``: True on completion tokens).

    >>> check_slots([7, 9, 9, 8], [], image_pad_id=9)
    Traceback (most recent call last):
    mmref.renderers.errors.SlotError: sequence: 2 image-pad tokens (id 9) lie outside every image slot, first at position 1; the sequence's images: none
    """
    ids = token_ids if isinstance(token_ids, list) else list(token_ids)
    previous_end = 0
    for index, slot in enumerate(slots):
        at = f"{where}: image slot {index} [{slot.offset}, {slot.end}) ({slot.ref.describe()})"
        if slot.offset < previous_end:
            raise SlotError(f"{at} starts before the previous slot ends at {previous_end}: slots must be sorted "
                            "and disjoint")
        if slot.end > len(ids):
            raise SlotError(f"{at} runs past the end of the {len(ids)}-token sequence")
        pads = ids[slot.offset:slot.end].count(image_pad_id)
        if pads != slot.length:
            raise SlotError(f"{at} covers {slot.length - pads} token(s) that are not image pads (id {image_pad_id}); "
                            f"expected {slot.length} pads")
        if (slot.offset > 0 and ids[slot.offset - 1] == image_pad_id) or (slot.end < len(ids) and ids[slot.end] == image_pad_id):
            raise SlotError(f"{at} is not a whole run of image pads (id {image_pad_id}): the run continues past the "
                            "slot, which is shifted or has the wrong length")
        if sampled is not None and any(sampled[slot.offset:slot.end]):
            raise SlotError(f"{at} covers sampled (completion) tokens; image pads are never sampled")
        previous_end = slot.end
    outside = ids.count(image_pad_id) - sum(slot.length for slot in slots)
    if outside:
        inside = set().union(*(range(s.offset, s.end) for s in slots)) if slots else set()
        first = next(i for i, t in enumerate(ids) if t == image_pad_id and i not in inside)
        kind = " (a sampled token)" if sampled is not None and sampled[first] else ""
        images = ", ".join(slot.ref.asset for slot in slots[:4]) + (", ..." if len(slots) > 4 else "") or "none"
        raise SlotError(f"{where}: {outside} image-pad tokens (id {image_pad_id}) lie outside every image slot, "
                        f"first at position {first}{kind}; the sequence's images: {images}")


def token_types(length: int, slots: Sequence[ImageSlot]) -> list[int]:
    """``mm_token_type_ids`` of a sequence: 1 inside image slots, 0 elsewhere.

    >>> token_types(4, [])
    [0, 0, 0, 0]
    """
    types = [0] * length
    for slot in slots:
        types[slot.offset:slot.end] = [1] * slot.length
    return types
