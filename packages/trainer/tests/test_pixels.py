"""``processor_sized``: the image both the trainer's and vLLM's processor get, already at the layout's size.

Sized by our code, the PIL processor makes exactly the pixels it makes from the original (the
trainer's), and its size is a fixed point of the processor's ``smart_resize``, so vLLM's processor
(torchvision, whose resize differs from PIL's) has nothing to resize either.
"""

import functools
import io
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmref.renderers import ImageStore
from mmref.renderers.layout import describe_image
from mmref.renderers.layout import layout_spec
from mmref.trainer.models import build_image_processor
from mmref.trainer.pixels import decoded_image, process_pixels, processor_size, processor_sized, stored_image_ref
from trainer_cases import FAMILIES

SMART = [f for f in FAMILIES if layout_spec(f).resize == "smart"]  # Qwen's smart_resize; Kimi resizes and pads


@functools.cache
def small_spec(family: str):
    """Few tokens per image (CPU-fast), min_pixels below max_pixels in every family."""
    return layout_spec(family, min_pixels=64 * 64, max_pixels=160 * 160)


@functools.cache
def processor(family: str):
    return build_image_processor(small_spec(family))


@st.composite
def images(draw, max_side=600):
    """Random-noise RGB images (the hardest case for interpolation) of sizes within Qwen's aspect limit."""
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(max(1, -(-width // 200)), min(max_side, width * 200)))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width, 3), np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=images())
def test_sized_image_gives_the_processors_pixels_exactly(family, image):
    spec, proc = small_spec(family), processor(family)
    grid = describe_image(spec, *image.size).grid_thw
    sized = processor_sized(image, grid, proc)
    assert sized.size == (processor_size(grid, proc) or image.size)
    expected = proc(images=[image], return_tensors="pt")
    got = proc(images=[sized], return_tensors="pt")
    assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])


@pytest.mark.parametrize("family", SMART)
@settings(max_examples=500, deadline=None)
@given(width=st.integers(1, 8192), height=st.integers(1, 8192))
def test_the_size_is_a_fixed_point_of_the_processors_smart_resize_or_none(family, width, height):
    if max(width, height) / min(width, height) > 200:
        return
    spec, proc = small_spec(family), processor(family)
    layout = describe_image(spec, width, height)
    module = sys.modules[type(proc).__module__]
    again = module.smart_resize(layout.resized_height, layout.resized_width, proc.patch_size * proc.merge_size,
                                min_pixels=proc.size["shortest_edge"], max_pixels=proc.size["longest_edge"])
    fixed = again == (layout.resized_height, layout.resized_width)
    assert processor_size(layout.grid_thw, proc) == ((layout.resized_width, layout.resized_height) if fixed else None)


def test_a_thin_image_past_max_pixels_goes_unsized():
    proc = processor("qwen2-vl")  # raised to min_pixels, 1 x 200 becomes 28 x 924: past max_pixels 25600
    grid = describe_image(small_spec("qwen2-vl"), 1, 200).grid_thw
    assert processor_size(grid, proc) is None
    image = Image.new("RGB", (1, 200))
    assert processor_sized(image, grid, proc) is image


def test_a_resize_and_pad_processor_gets_the_image_as_it_is():
    proc = processor("kimi-k2.5")
    image = Image.new("RGB", (173, 301))
    grid = describe_image(small_spec("kimi-k2.5"), *image.size).grid_thw
    assert processor_size(grid, proc) is None and processor_sized(image, grid, proc) is image


@pytest.mark.parametrize("family", SMART)
def test_the_vllm_engines_image_is_the_sized_one_and_the_trainers_pixels_come_from_it(family, tmp_path):
    spec, proc = small_spec(family), processor(family)
    original = Image.fromarray(np.random.default_rng(0).integers(0, 256, (173, 301, 3), np.uint8), "RGB")
    buffer = io.BytesIO()
    original.save(buffer, format="PNG")
    store = ImageStore(tmp_path)
    stored = store.put_bytes(buffer.getvalue(), "image/png")
    ref, data = stored_image_ref(store, spec, stored.asset, stored.sha256)
    decoded = decoded_image(data, ref, proc)  # what the server hands the vLLM engine
    assert decoded.image.tobytes() == processor_sized(original, ref.grid_thw, proc).tobytes()
    assert decoded.image.size == (ref.grid_thw[2] * proc.patch_size, ref.grid_thw[1] * proc.patch_size)
    trainer = process_pixels(data, ref, proc, "trainer")  # what the materializer and transformers engine use
    assert torch.equal(trainer.pixel_values, proc(images=[decoded.image], return_tensors="pt")["pixel_values"])
    assert torch.equal(trainer.pixel_values, proc(images=[original], return_tensors="pt")["pixel_values"])
