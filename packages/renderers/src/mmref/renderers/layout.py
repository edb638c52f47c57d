"""Layout math: an image's grid and placeholder count from its size alone.

Pure functions of integers (no PIL, no torch, about a microsecond per image), so the
client that renders tokens and the trainer that builds pixels agree without either one
running a processor.

    >>> describe_image(layout_spec("qwen2-vl"), width=1920, height=1080)
    ImageLayout(grid_thw=(1, 78, 138), num_tokens=2691, resized_height=1092, resized_width=1932)

Each family's spec has a ``fingerprint``: sha256 over ``mmref-layout:v1:<family>:``
plus its parameters as sorted ``key=json(value)`` pairs. A consumer recomputes the
fingerprint from its own processor configuration and refuses refs that differ.

A fingerprint is one-way, so to say *which* parameter drifted a consumer needs the
producer's spec: ``spec_for_fingerprint`` knows the published defaults and every spec
whose fingerprint this process has computed, and ``spec_differences`` lists the changes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

from mmref.renderers.errors import LayoutError
from mmref.renderers.refs import FAMILIES, Family

MAX_ASPECT_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageLayout:
    """Where an image of a given size lands: its patch grid and prompt placeholder count."""

    grid_thw: tuple[int, int, int]
    num_tokens: int
    resized_height: int
    resized_width: int


@dataclass(frozen=True)
class LayoutSpec:
    """Resize rules of one model family, as the published checkpoints configure them.

    ``resize="smart"`` is Qwen-VL's ``smart_resize``; ``resize="navit"`` is Kimi's navit
    resize. Both give one placeholder per merged patch (``t*h*w / merge**2``), as the
    transformers processors of both expand a prompt's image token.
    """

    family: Family
    resize: Literal["smart", "navit"]
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int = 0
    max_pixels: int = 0
    in_patch_limit: int = 0
    patch_limit_on_one_side: int = 0

    @property
    def factor(self) -> int:
        """Side length in pixels of one merged patch."""
        return self.patch_size * self.merge_size

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 hex over the family and every parameter; the version pin between stages."""
        params = {k: v for k, v in dataclasses.asdict(self).items() if k != "family"}
        pairs = ";".join(f"{k}={json.dumps(params[k], separators=(',', ':'))}" for k in sorted(params))
        digest = hashlib.sha256(f"mmref-layout:v1:{self.family}:{pairs}".encode()).hexdigest()
        _SEEN_SPECS.remember(digest, self)
        return digest

    def pixel_values_shape(self, grid_thw: tuple[int, int, int]) -> tuple[int, ...]:
        """Shape of the ``pixel_values`` the family's processor makes for an image of this grid (3 channels).

        Qwen-VL: one flat row per patch, ``(t*h*w, 3*temporal*p*p)``; Kimi: ``(t*h*w, 3, p, p)``.
        """
        t, h, w = grid_thw
        if self.resize == "navit":
            return (t * h * w, 3, self.patch_size, self.patch_size)
        return (t * h * w, 3 * self.temporal_patch_size * self.patch_size**2)

    def pixel_values_nbytes(self, grid_thw: tuple[int, int, int]) -> int:
        """Bytes of the float32 ``pixel_values`` a processor makes for an image of this grid."""
        return math.prod(self.pixel_values_shape(grid_thw)) * 4

    def replace(self, **changes: Any) -> LayoutSpec:
        """A copy with some parameters changed, e.g. ``spec.replace(max_pixels=512 * 28 * 28)``."""
        return dataclasses.replace(self, **changes)


class _SpecsByFingerprint:
    """Specs whose fingerprint this process computed, so a drift error can name the producer's parameters.

    Bounded (oldest forgotten first): a property test may build thousands of specs, a run
    a handful. Thread-safe: the inference server checks refs from worker threads.
    """

    def __init__(self, limit: int) -> None:
        self._specs: dict[str, LayoutSpec] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def remember(self, fingerprint: str, spec: LayoutSpec) -> None:
        with self._lock:
            self._specs.pop(fingerprint, None)
            self._specs[fingerprint] = spec
            while len(self._specs) > self._limit:
                del self._specs[next(iter(self._specs))]

    def get(self, fingerprint: str) -> LayoutSpec | None:
        with self._lock:
            return self._specs.get(fingerprint)


# 4096 specs of ~1 KB each: a few MB at most, far more distinct configs than one run has.
_SEEN_SPECS = _SpecsByFingerprint(limit=4096)

_QWEN2 = dict(resize="smart", patch_size=14, merge_size=2, temporal_patch_size=2,
              min_pixels=3136, max_pixels=12_845_056, image_mean=CLIP_MEAN, image_std=CLIP_STD)
_QWEN3 = dict(resize="smart", patch_size=16, merge_size=2, temporal_patch_size=2,
              min_pixels=65_536, max_pixels=16_777_216, image_mean=HALF, image_std=HALF)
_KIMI = dict(resize="navit", patch_size=14, merge_size=2, temporal_patch_size=1,
             in_patch_limit=16_384, patch_limit_on_one_side=512, image_mean=HALF, image_std=HALF)

DEFAULT_SPECS: dict[str, LayoutSpec] = {
    "qwen2-vl": LayoutSpec(family="qwen2-vl", **_QWEN2),
    "qwen2.5-vl": LayoutSpec(family="qwen2.5-vl", **_QWEN2),
    "qwen3-vl": LayoutSpec(family="qwen3-vl", **_QWEN3),
    "qwen3.5": LayoutSpec(family="qwen3.5", **_QWEN3),
    "kimi-k2.5": LayoutSpec(family="kimi-k2.5", **_KIMI),
}


def layout_spec(family: str, **overrides: Any) -> LayoutSpec:
    """The published defaults of ``family``, with optional overrides (e.g. min/max pixels)."""
    if family not in DEFAULT_SPECS:
        raise LayoutError(f"unknown layout family {family!r}; known families: {list(FAMILIES)}")
    spec = DEFAULT_SPECS[family]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(spec)}
    if unknown:
        raise LayoutError(f"unknown layout parameter(s) {sorted(unknown)} for family {family!r}")
    return spec.replace(**overrides) if overrides else spec


def spec_for_fingerprint(fingerprint: str) -> LayoutSpec | None:
    """The spec with this fingerprint: a published default, or one computed in this process; else None.

    >>> spec_for_fingerprint(layout_spec("qwen2-vl", max_pixels=100_352).fingerprint).max_pixels
    100352
    """
    for spec in DEFAULT_SPECS.values():
        if spec.fingerprint == fingerprint:
            return spec
    return _SEEN_SPECS.get(fingerprint)


def spec_differences(a: LayoutSpec, b: LayoutSpec) -> list[tuple[str, Any, Any]]:
    """``(parameter, value in a, value in b)`` for every layout parameter where the specs differ.

    >>> spec_differences(layout_spec("qwen2-vl"), layout_spec("qwen2-vl", merge_size=1))
    [('merge_size', 2, 1)]
    """
    return [(f.name, getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(b, f.name)]


def spec_from_image_processor(family: str, processor: Any) -> LayoutSpec:
    """The spec a live transformers image processor implements, for fingerprint checks.

    Reads the attributes Qwen-VL image processors expose (``patch_size``, ``merge_size``,
    ``size['shortest_edge'|'longest_edge']`` or ``min_pixels``/``max_pixels``, mean, std), or
    Kimi's (``max_patches``, ``size['max_height']``).
    """
    spec = layout_spec(family)
    size = getattr(processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
    mean_std = dict(image_mean=tuple(float(x) for x in processor.image_mean),
                    image_std=tuple(float(x) for x in processor.image_std))
    if spec.resize == "navit":
        if get("max_height") != get("max_width"):
            raise LayoutError(f"{family} image processor size {dict(size)}: max_height and max_width must be equal")
        return spec.replace(patch_size=int(processor.patch_size), merge_size=int(processor.merge_size),
                            in_patch_limit=int(processor.max_patches), patch_limit_on_one_side=int(get("max_height")),
                            **mean_std)
    min_pixels = get("shortest_edge") or getattr(processor, "min_pixels", None) or spec.min_pixels
    max_pixels = get("longest_edge") or getattr(processor, "max_pixels", None) or spec.max_pixels
    return spec.replace(
        patch_size=int(processor.patch_size),
        merge_size=int(processor.merge_size),
        temporal_patch_size=int(processor.temporal_patch_size),
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
        **mean_std,
    )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL resize: both sides multiples of ``factor``, area in [min, max], aspect kept.

    Same arithmetic as transformers' ``smart_resize`` (Python's round is half-to-even).
    """
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def navit_scaled_size(height: int, width: int, spec: LayoutSpec) -> tuple[int, int]:
    """Kimi navit resize before padding: scaled (never up) under the total and per-side patch limits."""
    p, side = spec.patch_size, spec.patch_limit_on_one_side
    scale = min(
        1.0,
        math.sqrt(spec.in_patch_limit / (max(1.0, width // p) * max(1.0, height // p))),
        side * p / width,
        side * p / height,
    )
    return min(max(1, int(height * scale)), side * p), min(max(1, int(width * scale)), side * p)


def navit_resize(height: int, width: int, spec: LayoutSpec) -> tuple[int, int]:
    """Kimi navit resize: ``navit_scaled_size``, then each side padded up to the merge factor."""
    new_h, new_w = navit_scaled_size(height, width, spec)
    f = spec.factor
    return new_h + (f - new_h % f) % f, new_w + (f - new_w % f) % f


def check_size(width: int, height: int) -> None:
    """Raise ``LayoutError`` for sizes no family can place."""
    if not (isinstance(width, int) and isinstance(height, int)) or width <= 0 or height <= 0:
        raise LayoutError(f"image size must be positive integers, got width={width!r} height={height!r}")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise LayoutError(
            f"image {width}x{height} has aspect ratio {max(width, height) / min(width, height):.1f} > "
            f"{MAX_ASPECT_RATIO}; crop or pad it before sending"
        )


def describe_image(spec: LayoutSpec, width: int, height: int) -> ImageLayout:
    """Grid ``(t, h, w)`` in patches and prompt placeholder count of an image of this size."""
    check_size(width, height)
    if spec.resize == "navit":
        rh, rw = navit_resize(height, width, spec)
    else:
        rh, rw = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    grid = (1, rh // spec.patch_size, rw // spec.patch_size)
    return ImageLayout(grid, grid[0] * grid[1] * grid[2] // spec.merge_size**2, rh, rw)
