"""The ref contract: fields, string codec, and every parse failure as a RefError."""

import base64
import json

import pytest

from mmref.renderers.errors import RefError
from mmref.renderers.refs import ImageSlot, RawImageRef, asset_name, parse_ref, reject_pixel_payload

SHA = "ab" * 32
FP = "cd" * 32


def make(**changes):
    fields = dict(family="qwen2-vl", fingerprint=FP, sha256=SHA, asset=asset_name(SHA, "image/png"),
                  media_type="image/png", width=640, height=480, grid_thw=(1, 34, 46), num_tokens=391)
    return RawImageRef(**(fields | changes))


def encode_payload(payload, version=1):
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"mmref:v{version}:{body}"


def test_encode_parse_round_trip_is_identity():
    ref = make()
    assert parse_ref(ref.encode()) == ref


def test_encoding_is_compact_sorted_json_under_512_bytes():
    encoded = make().encode()
    body = json.loads(base64.urlsafe_b64decode(encoded.split(":", 2)[2] + "=="))
    assert list(body) == sorted(body)
    assert len(encoded) <= 512


def test_asset_name_is_sha_prefix_and_extension():
    assert asset_name(SHA, "image/jpeg") == SHA[:16] + ".jpg"


def test_ref_is_frozen():
    with pytest.raises(Exception):
        make().width = 3


@pytest.mark.parametrize("text,needle", [
    ("hello", "not a ref"),
    ("mmref:1:abc", "not a ref"),
    ("mmref:v9:abc", "understands [1]"),
    ("mmref:v1:a+b/", "not base64url"),
    ("mmref:v1:a", "not valid base64url"),
    ("mmref:v1:" + base64.urlsafe_b64encode(b"{nope").decode().rstrip("="), "not JSON"),
    ("mmref:v1:" + base64.urlsafe_b64encode(b"[1,2]").decode().rstrip("="), "JSON object"),
])
def test_parse_rejects_malformed_text_naming_the_problem(text, needle):
    with pytest.raises(RefError, match=".*" + needle.replace("[", r"\[").replace("]", r"\]")):
        parse_ref(text)


def test_parse_rejects_non_string():
    with pytest.raises(RefError, match="must be a string"):
        parse_ref(b"mmref:v1:x")


def test_header_and_body_versions_must_agree():
    payload = make().model_dump(mode="json") | {"version": 2}
    with pytest.raises(RefError, match="header says v1"):
        parse_ref(encode_payload(payload))


@pytest.mark.parametrize("field,value,needle", [
    ("sha256", "XY" * 32, "64 lowercase hex"),
    ("fingerprint", "ab", "64 lowercase hex"),
    ("family", "llava", "family"),
    ("media_type", "image/bmp", "media_type"),
    ("width", 0, "positive"),
    ("num_tokens", -1, "positive"),
    ("grid_thw", [1, 0, 4], "grid_thw"),
    ("modality", "video", "modality"),
    ("extra", 1, "extra"),
])
def test_parse_rejects_fields_that_break_their_pattern(field, value, needle):
    payload = make().model_dump(mode="json") | {field: value}
    with pytest.raises(RefError, match=needle):
        parse_ref(encode_payload(payload))


@pytest.mark.parametrize("asset,needle", [
    ("/etc/passwd", "absolute"),
    ("C:evil.png", "absolute"),
    ("../" + SHA[:16] + ".png", r"'\.\.'"),
    ("sub/" + SHA[:16] + ".png", "path separator"),
    ("sub\\x.png", "path separator"),
    ("%2e%2e%2fx.png", "path separator or escape"),
    ("abcd.png", "16 hex digits"),
])
def test_parse_rejects_unsafe_assets(asset, needle):
    payload = make().model_dump(mode="json") | {"asset": asset}
    with pytest.raises(RefError, match=needle):
        parse_ref(encode_payload(payload))


def test_asset_must_match_sha_and_media_type():
    payload = make().model_dump(mode="json") | {"asset": "0123456789abcdef.png"}
    with pytest.raises(RefError, match="does not match sha256"):
        parse_ref(encode_payload(payload))


@pytest.mark.parametrize("key", ["pixel_values", "image_embeds", "image_features"])
def test_pixel_payload_rejected_at_any_depth(key):
    with pytest.raises(RefError, match=key):
        reject_pixel_payload({"messages": [{"content": [{"x": {key: [0.1]}}]}]})
    payload = make().model_dump(mode="json") | {key: [[0.0]]}
    with pytest.raises(RefError, match=key):
        parse_ref(encode_payload(payload))


def test_clean_payload_passes_pixel_check():
    reject_pixel_payload({"messages": [{"content": "pixel talk", "image_url": {"url": "mmref:v1:x"}}]})


def test_slot_length_must_equal_num_tokens():
    ref = make()
    with pytest.raises(ValueError, match="slot length 3 != ref.num_tokens 391"):
        ImageSlot(ref=ref, offset=0, length=3)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        ImageSlot(ref=ref, offset=-1, length=391)


def test_slot_wire_form_carries_ref_string_and_round_trips():
    slot = ImageSlot(ref=make(), offset=7, length=391)
    wire = slot.model_dump(mode="json")
    assert wire["ref"].startswith("mmref:v1:") and wire["offset"] == 7
    assert ImageSlot.model_validate(wire) == slot
    assert slot.shifted(10).offset == 17 and slot.end == 398
