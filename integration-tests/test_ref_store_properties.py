"""Refs survive their codec, parse_ref raises only RefError, and the store round-trips."""

import contextlib
import io

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmref.renderers.contract import make_ref
from mmref.renderers.errors import IntegrityError, RefError
from mmref.renderers.layout import layout_spec
from mmref.renderers.refs import FAMILIES, EXTENSIONS, RawImageRef, asset_name, parse_ref
from mmref.renderers.store import ImageStore

hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def refs(draw):
    sha, media_type = draw(hex64), draw(st.sampled_from(sorted(EXTENSIONS)))
    return RawImageRef(
        family=draw(st.sampled_from(FAMILIES)), fingerprint=draw(hex64), sha256=sha,
        asset=asset_name(sha, media_type), media_type=media_type,
        width=draw(st.integers(1, 10**5)), height=draw(st.integers(1, 10**5)),
        grid_thw=tuple(draw(st.integers(1, 10**4)) for _ in range(3)), num_tokens=draw(st.integers(1, 10**6)),
    )


@settings(max_examples=300, deadline=None)
@given(ref=refs())
def test_every_valid_ref_survives_encode_parse(ref):
    encoded = ref.encode()
    assert parse_ref(encoded) == ref
    assert parse_ref(encoded).encode() == encoded


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(), st.text().map(lambda t: "mmref:v1:" + t), st.binary().map(repr),
                      st.from_regex(r"mmref:v[0-9]{1,3}:[A-Za-z0-9_-]{0,80}", fullmatch=True)))
def test_parse_ref_on_arbitrary_text_raises_only_ref_error(text):
    with contextlib.suppress(RefError):  # anything else propagates and fails the test
        parse_ref(text)


@settings(max_examples=200, deadline=None)
@given(ref=refs(), position=st.integers(0, 10**4), char=st.sampled_from("AZaz09-_"))
def test_mutated_ref_strings_parse_or_raise_ref_error(ref, position, char):
    encoded = ref.encode()
    i = 9 + position % (len(encoded) - 9)
    with contextlib.suppress(RefError):
        parse_ref(encoded[:i] + char + encoded[i + 1:])


def png(width, height, color):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 300), height=st.integers(2, 150), color=st.tuples(*[st.integers(0, 255)] * 3),
       family=st.sampled_from(FAMILIES))
def test_store_round_trip_dedup_and_tamper_detection(tmp_path_factory, width, height, color, family):
    root = tmp_path_factory.mktemp("store")
    store, data = ImageStore(root), png(width, height, color)
    first, again = store.put_bytes(data, "image/png"), store.put_bytes(data, "image/png")
    assert first.asset == again.asset and again.deduplicated
    ref = make_ref(layout_spec(family), first)
    assert store.read(parse_ref(ref.encode())) == data
    (root / first.asset).write_bytes(data + b"\x00")
    with pytest.raises(IntegrityError):
        store.read(ref)
