"""Making refs and verifying them against a consumer's own spec; decoding with typed errors."""

import dataclasses
import hashlib
import io
import json

import pytest
from PIL import Image

from mmref.renderers.contract import make_ref, verify_ref
from mmref.renderers.decode import decode_rgb
from mmref.renderers.errors import ContractMismatchError, InvalidImageError
from mmref.renderers.layout import describe_image, layout_spec, spec_for_fingerprint
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
    with pytest.raises(ContractMismatchError, match=r"inference server: layout drift for image asset=.*"
                       r"max_pixels 12845056 \(ref\) != 100352 \(this inference server\).*fingerprint"):
        verify_ref(ref, drifted, stage="inference server")


DRIFTS = [("min_pixels", 8 * 28 * 28), ("max_pixels", 512 * 28 * 28), ("patch_size", 16), ("merge_size", 1),
          ("temporal_patch_size", 1), ("image_mean", (0.5, 0.5, 0.5)), ("image_std", (0.25, 0.25, 0.26))]


@pytest.mark.parametrize("producer_drifted", [True, False], ids=["producer-drifted", "consumer-drifted"])
@pytest.mark.parametrize("name,value", DRIFTS, ids=[name for name, _ in DRIFTS])
def test_drift_error_names_the_parameter_and_both_values(stored, name, value, producer_drifted):
    default = layout_spec("qwen2-vl")
    drifted = layout_spec("qwen2-vl", **{name: value})
    producer, consumer = (drifted, default) if producer_drifted else (default, drifted)
    ref = make_ref(producer, stored[0])
    with pytest.raises(ContractMismatchError) as caught:
        verify_ref(ref, consumer, stage="trainer")
    message = str(caught.value)
    expected = f"{name} {getattr(producer, name)} (ref) != {getattr(consumer, name)} (this trainer)"
    assert expected in message, message
    assert ref.describe() in message
    named = message.split(": ", 2)[2].split(" (layout fingerprint")[0]
    assert named == expected, f"unchanged parameters listed too: {named}"


def test_drift_error_lists_every_changed_parameter(stored):
    producer = layout_spec("qwen2-vl", merge_size=1, image_mean=(0.5, 0.5, 0.5))
    ref = make_ref(producer, stored[0])
    with pytest.raises(ContractMismatchError) as caught:
        verify_ref(ref, layout_spec("qwen2-vl"), stage="inference server")
    message = str(caught.value)
    assert "merge_size 1 (ref) != 2 (this inference server)" in message
    assert "image_mean (0.5, 0.5, 0.5) (ref) != (0.48145466, 0.4578275, 0.40821073) (this inference server)" in message


def _fingerprint_by_the_documented_formula(spec) -> str:
    # As another process would compute it: this process never evaluates ``spec.fingerprint``.
    params = {k: v for k, v in dataclasses.asdict(spec).items() if k != "family"}
    pairs = ";".join(f"{k}={json.dumps(params[k], separators=(',', ':'))}" for k in sorted(params))
    return hashlib.sha256(f"mmref-layout:v1:{spec.family}:{pairs}".encode()).hexdigest()


def test_unknown_producer_gives_both_fingerprints_and_says_so(stored):
    consumer = layout_spec("qwen2-vl")
    foreign = dataclasses.replace(consumer, max_pixels=777 * 28 * 28 + 1)  # fingerprint never computed here
    foreign_print = _fingerprint_by_the_documented_formula(foreign)
    assert _fingerprint_by_the_documented_formula(consumer) == consumer.fingerprint  # the formula is the real one
    assert spec_for_fingerprint(foreign_print) is None
    ref = make_ref(consumer, stored[0]).model_copy(update={"fingerprint": foreign_print})
    with pytest.raises(ContractMismatchError) as caught:
        verify_ref(ref, consumer, stage="inference server")
    message = str(caught.value)
    assert f"layout fingerprint {foreign_print} (ref) != {consumer.fingerprint} (this inference server)" in message
    assert "the producer's layout parameters are unknown to this process; compare the processor configs" in message
    assert "max_pixels=12845056" in message and ref.describe() in message


def test_every_spec_whose_fingerprint_was_computed_is_known_by_it():
    spec = layout_spec("qwen3-vl", min_pixels=123 * 32 * 32, image_std=(0.1, 0.2, 0.3))
    assert spec_for_fingerprint(spec.fingerprint) == spec
    assert spec_for_fingerprint(layout_spec("kimi-k2.5").fingerprint) == layout_spec("kimi-k2.5")


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
