"""Layout math: hand-worked grids, fingerprints, and errors."""

import pytest

from mmref.renderers.errors import LayoutError
from mmref.renderers.layout import (
    DEFAULT_SPECS,
    _SpecsByFingerprint,
    describe_image,
    layout_spec,
    smart_resize,
    spec_differences,
    spec_for_fingerprint,
)


@pytest.mark.parametrize("family,size,grid,tokens", [
    # 1920x1080, factor 28: round(1080/28)=39 -> 1092, round(1920/28)=69 -> 1932; 78*138/4
    ("qwen2-vl", (1920, 1080), (1, 78, 138), 2691),
    ("qwen2.5-vl", (1920, 1080), (1, 78, 138), 2691),
    # factor 32: round(33.75)=34 -> 1088, 60 -> 1920; 68*120/4
    ("qwen3-vl", (1920, 1080), (1, 68, 120), 2040),
    ("qwen3.5", (1920, 1080), (1, 68, 120), 2040),
    # 10x10 is under min_pixels 3136: beta=5.6 -> ceil(56/28)*28 = 56 -> grid 4x4, 4 tokens
    ("qwen2-vl", (10, 10), (1, 4, 4), 4),
    # kimi: 1920//14 * 1080//14 = 137*77 = 10549 < 16384 -> no scale; pad 1080 -> 1092, 1920 -> 1932;
    # one pad per merged patch, as Kimi_K25Processor expands it: 78*138/4
    ("kimi-k2.5", (1920, 1080), (1, 78, 138), 2691),
])
def test_describe_image_matches_hand_worked_values(family, size, grid, tokens):
    layout = describe_image(layout_spec(family), *size)
    assert layout.grid_thw == grid and layout.num_tokens == tokens


def test_round_half_even_like_python_round():
    # 42/28 = 1.5 rounds to 2 (even), 70/28 = 2.5 rounds to 2 (even): both sides 56
    assert smart_resize(42, 70, 28, 0, 10**9) == (56, 56)


def test_max_pixels_caps_area():
    spec = layout_spec("qwen2-vl", max_pixels=256 * 28 * 28)
    layout = describe_image(spec, 4000, 3000)
    assert layout.resized_height * layout.resized_width <= spec.max_pixels
    assert layout.num_tokens <= 256


def test_kimi_limits_patches_per_side_and_total():
    spec = layout_spec("kimi-k2.5")
    layout = describe_image(spec, 8000, 40)
    assert layout.grid_thw[2] <= spec.patch_limit_on_one_side + spec.merge_size
    big = describe_image(spec, 8192, 8192)
    assert big.grid_thw[1] * big.grid_thw[2] <= spec.in_patch_limit + 4 * 128  # padding adds at most one merged row/col


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (3.5, 10)])
def test_non_positive_or_non_integer_size_is_a_layout_error(size):
    with pytest.raises(LayoutError, match="positive integers"):
        describe_image(layout_spec("qwen2-vl"), *size)


def test_aspect_ratio_over_200_is_a_layout_error():
    with pytest.raises(LayoutError, match="aspect ratio 201.0 > 200"):
        describe_image(layout_spec("qwen3-vl"), 201, 1)
    describe_image(layout_spec("qwen3-vl"), 200, 1)


def test_fingerprints_differ_per_family_and_parameter():
    prints = {spec.fingerprint for spec in DEFAULT_SPECS.values()}
    assert len(prints) == len(DEFAULT_SPECS)
    base = layout_spec("qwen2-vl")
    assert base.replace(max_pixels=base.max_pixels - 1).fingerprint != base.fingerprint
    assert layout_spec("qwen2-vl").fingerprint == base.fingerprint


def test_unknown_family_and_parameter_are_named():
    with pytest.raises(LayoutError, match="'llava'.*known families"):
        layout_spec("llava")
    with pytest.raises(LayoutError, match="min_pix"):
        layout_spec("qwen2-vl", min_pix=3)


@pytest.mark.parametrize("family,patch,merge,temporal,min_pixels,max_pixels", [
    # preprocessor_config.json of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct
    ("qwen2-vl", 14, 2, 2, 3136, 12_845_056),
    ("qwen2.5-vl", 14, 2, 2, 3136, 12_845_056),
    # Qwen/Qwen3-VL-8B-Instruct: size {shortest_edge: 65536, longest_edge: 16777216}, patch 16
    ("qwen3-vl", 16, 2, 2, 65_536, 16_777_216),
    ("qwen3.5", 16, 2, 2, 65_536, 16_777_216),
])
def test_default_specs_match_the_published_checkpoints(family, patch, merge, temporal, min_pixels, max_pixels):
    spec = layout_spec(family)
    assert (spec.patch_size, spec.merge_size, spec.temporal_patch_size, spec.min_pixels, spec.max_pixels) == (
        patch, merge, temporal, min_pixels, max_pixels)


def test_spec_differences_lists_exactly_the_changed_parameters():
    base = layout_spec("qwen3-vl")
    assert spec_differences(base, base) == []
    changed = base.replace(temporal_patch_size=1, image_std=(0.2, 0.2, 0.2))
    assert spec_differences(base, changed) == [("temporal_patch_size", 2, 1),
                                               ("image_std", (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))]


def test_specs_by_fingerprint_forgets_the_oldest_past_its_limit():
    seen = _SpecsByFingerprint(limit=2)
    specs = [layout_spec("qwen2-vl", max_pixels=n * 28 * 28) for n in (100, 200, 300)]
    for spec in specs:
        seen.remember(spec.fingerprint, spec)
    assert [seen.get(s.fingerprint) for s in specs] == [None, specs[1], specs[2]]
    assert spec_for_fingerprint(specs[0].fingerprint) == specs[0]  # the process-wide registry kept it
