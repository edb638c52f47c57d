"""Layout math equals the real transformers image processor, for every Qwen family.

Two tiers keep this exact and fast: the processor's own size logic (its module's
``smart_resize`` and ``get_number_of_image_patches``) over the full 1..8192 range, and the processor's full
``__call__`` on real images up to 2048 a side plus fixed 4K screenshots.
"""

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmref.renderers.layout import describe_image, layout_spec
from mmref.trainer.models import build_image_processor, processor_spec

QWEN = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5"]
CUSTOM = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}
SPECS = [(f, {}) for f in QWEN] + [(f, CUSTOM) for f in QWEN]
IDS = [f"{f}-{'custom' if o else 'default'}" for f, o in SPECS]


@st.composite
def sizes(draw, max_side=8192):
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(max(1, -(-width // 200)), min(max_side, width * 200)))
    return width, height


def grid_from_processor(processor, width, height):
    image = Image.new("RGB", (width, height), (90, 160, 30))
    return tuple(int(x) for x in processor(images=[image])["image_grid_thw"][0])


@pytest.mark.parametrize("family,overrides", SPECS, ids=IDS)
@settings(max_examples=300, deadline=None)
@given(size=sizes())
def test_grid_and_token_count_equal_the_processors_size_logic_full_range(family, overrides, size):
    spec = layout_spec(family, **overrides)
    processor = build_image_processor(spec)
    layout = describe_image(spec, *size)
    # The resize the processor's own module does in __call__, with the processor's own parameters.
    module = sys.modules[type(processor).__module__]
    height, width = module.smart_resize(size[1], size[0], processor.patch_size * processor.merge_size,
                                        min_pixels=processor.size["shortest_edge"],
                                        max_pixels=processor.size["longest_edge"])
    assert (layout.resized_height, layout.resized_width) == (height, width)
    assert layout.grid_thw == (1, height // processor.patch_size, width // processor.patch_size)
    patches = processor.get_number_of_image_patches(size[1], size[0])
    assert layout.num_tokens == patches // spec.merge_size**2


@pytest.mark.parametrize("family,overrides", SPECS, ids=IDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=sizes(max_side=2048))
def test_grid_equals_processor_call_on_real_images(family, overrides, size):
    spec = layout_spec(family, **overrides)
    assert describe_image(spec, *size).grid_thw == grid_from_processor(build_image_processor(spec), *size)


@pytest.mark.parametrize("family", QWEN)
def test_grid_equals_processor_call_on_4k_screenshot(family):
    spec = layout_spec(family)
    assert describe_image(spec, 3840, 2160).grid_thw == grid_from_processor(build_image_processor(spec), 3840, 2160)


@pytest.mark.parametrize("family,overrides", SPECS, ids=IDS)
def test_fingerprint_recomputed_from_live_processor_matches_spec(family, overrides):
    spec = layout_spec(family, **overrides)
    assert processor_spec(family, build_image_processor(spec)).fingerprint == spec.fingerprint
