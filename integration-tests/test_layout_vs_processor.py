"""Layout math equals the real transformers image processor, for every family.

Two tiers keep this exact and fast: the processor's own size logic (its module's
``smart_resize`` and ``get_number_of_image_patches``) over the full 1..8192 range, and the processor's full
``__call__`` on real images up to 2048 a side plus fixed 4K screenshots.

Kimi K2.5: transformers has its image processor on the torchvision backend only, so mmref
processes with its PIL port (``mmref.renderers.kimi_processor``, checked on real images here)
and the size logic is checked against transformers' own module (``navit_resize``,
``get_number_of_image_patches``) and processor (``Kimi_K25Processor.replace_image_token``, the
placeholder count), imported with a stand-in for the torchvision functions none of them calls.
"""

import importlib
import sys
import types
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import numpy as np
from PIL import Image

from mmref.renderers.layout import describe_image, layout_spec, navit_scaled_size
from mmref.trainer.models import build_image_processor, processor_spec

QWEN = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5"]
CUSTOM = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}
KIMI_CUSTOM = {"in_patch_limit": 1024, "patch_limit_on_one_side": 48}
SPECS = ([(f, {}) for f in QWEN] + [(f, CUSTOM) for f in QWEN]
         + [("kimi-k2.5", {}), ("kimi-k2.5", KIMI_CUSTOM)])
IDS = [f"{f}-{'custom' if o else 'default'}" for f, o in SPECS]
QWEN_SPECS = [(f, o) for f, o in SPECS if f in QWEN]
KIMI_SPECS = [(f, o) for f, o in SPECS if f == "kimi-k2.5"]


def kimi_transformers_modules():
    """transformers' Kimi K2.5 image-processing and processing modules, imported without torchvision.

    Only the image-processing module's top-level ``torchvision.transforms.v2.functional`` import
    needs torchvision; its size logic never calls it, so a stand-in module serves for the import.
    """
    pytest.importorskip("transformers.models.kimi_k25")
    name = "transformers.models.kimi_k25.image_processing_kimi_k25"
    stand_in = {m: types.ModuleType(m) for m in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                                                 "torchvision.transforms.v2.functional")}
    stand_in["torchvision.transforms.v2"].functional = stand_in["torchvision.transforms.v2.functional"]
    with mock.patch.dict(sys.modules, {k: v for k, v in stand_in.items() if k not in sys.modules}):
        images = sys.modules.get(name) or importlib.import_module(name)
    return images, importlib.import_module("transformers.models.kimi_k25.processing_kimi_k25")


@st.composite
def sizes(draw, max_side=8192):
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(max(1, -(-width // 200)), min(max_side, width * 200)))
    return width, height


def grid_from_processor(processor, width, height):
    image = Image.new("RGB", (width, height), (90, 160, 30))
    return tuple(int(x) for x in processor(images=[image])["image_grid_thw"][0])


@pytest.mark.parametrize("family,overrides", QWEN_SPECS, ids=IDS[:len(QWEN_SPECS)])
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


@pytest.mark.parametrize("family", [*QWEN, "kimi-k2.5"])
def test_grid_equals_processor_call_on_4k_screenshot(family):
    spec = layout_spec(family)
    assert describe_image(spec, 3840, 2160).grid_thw == grid_from_processor(build_image_processor(spec), 3840, 2160)


@pytest.mark.parametrize("family,overrides", SPECS, ids=IDS)
def test_fingerprint_recomputed_from_live_processor_matches_spec(family, overrides):
    spec = layout_spec(family, **overrides)
    assert processor_spec(family, build_image_processor(spec)).fingerprint == spec.fingerprint


@pytest.mark.parametrize("family,overrides", KIMI_SPECS, ids=IDS[len(QWEN_SPECS):])
@settings(max_examples=300, deadline=None)
@given(size=sizes())
def test_kimi_grid_and_token_count_equal_transformers_size_logic_full_range(family, overrides, size):
    images, processing = kimi_transformers_modules()
    spec = layout_spec(family, **overrides)
    processor = build_image_processor(spec)  # the PIL port, holding the parameters transformers' methods read
    layout = describe_image(spec, *size)
    scaled, padded = images.navit_resize(size[1], size[0], patch_size=processor.patch_size,
                                         merge_kernel_size=processor.merge_size, max_patches=processor.max_patches,
                                         max_size_per_side=processor.size["max_height"])
    assert navit_scaled_size(size[1], size[0], spec) == scaled
    assert (layout.resized_height, layout.resized_width) == padded
    assert layout.grid_thw == (1, padded[0] // spec.patch_size, padded[1] // spec.patch_size)
    patches = images.Kimi_K25ImageProcessor.get_number_of_image_patches(processor, size[1], size[0])
    assert layout.num_tokens == patches // spec.merge_size**2
    expand = processing.Kimi_K25Processor.replace_image_token
    pads = expand(types.SimpleNamespace(image_processor=processor, image_token="<p>"),
                  {"image_grid_thw": [np.array(layout.grid_thw)]}, 0)
    assert pads == "<p>" * layout.num_tokens
