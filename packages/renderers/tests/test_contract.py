"""Making refs and verifying them against a consumer's own spec; decoding with typed errors."""

import io

import pytest
from PIL import Image

from mmref.renderers.contract import make_ref, verify_ref
from mmref.renderers.decode import decode_rgb
from mmref.renderers.errors import ContractMismatchError, InvalidImageError
from mmref.renderers.layout import describe_image, layout_spec
from mmref.renderers.store import ImageStore


@pytest.fixture
def stored(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (640, 360), (1, 2, 3)).save(buffer, "PNG")
    return ImageStore(tmp_path).put_bytes(buffer.getvalue(), "image/png"), buffer.getvalue()


def test_make_ref_carries_layout_of_spec(stored):
    spec = layout_spec("qwen2.5-vl")
    ref = make_ref(spec, stored[0])
    layout = describe_image(spec, 640, 360)
    assert (ref.grid_thw, ref.num_tokens, ref.fingerprint) == (layout.grid_thw, layout.num_tokens, spec.fingerprint)
    verify_ref(ref, spec, stage="test")


def test_fingerprint_drift_is_named(stored):
    ref = make_ref(layout_spec("qwen2-vl"), stored[0])
    drifted = layout_spec("qwen2-vl", max_pixels=128 * 28 * 28)
    with pytest.raises(ContractMismatchError, match=r"inference server: image asset=.*fingerprint .*max_pixels=100352"):
        verify_ref(ref, drifted, stage="inference server")


def test_family_mismatch_is_named(stored):
    ref = make_ref(layout_spec("qwen2-vl"), stored[0])
    with pytest.raises(ContractMismatchError, match="ref family 'qwen2-vl' but this trainer serves 'qwen3-vl'"):
        verify_ref(ref, layout_spec("qwen3-vl"), stage="trainer")


@pytest.mark.parametrize("field,value,needle", [("grid_thw", (1, 2, 2), "grid_thw"), ("num_tokens", 7, "num_tokens")])
def test_edited_grid_or_token_count_is_caught(stored, field, value, needle):
    ref = make_ref(layout_spec("qwen2-vl"), stored[0])
    edited = ref.model_copy(update={field: value})
    with pytest.raises(ContractMismatchError, match=needle):
        verify_ref(edited, layout_spec("qwen2-vl"), stage="trainer")


def test_decode_rgb_checks_size_and_corruption(stored):
    info, data = stored
    ref = make_ref(layout_spec("qwen2-vl"), info)
    assert decode_rgb(data, ref).size == (640, 360)
    with pytest.raises(InvalidImageError, match=f"{ref.asset}.*cannot decode"):
        decode_rgb(data[: len(data) // 2], ref)
    other = ref.model_copy(update={"width": 641})
    with pytest.raises(InvalidImageError, match="decoded size 640x360 != ref size 641x360"):
        decode_rgb(data, other)
