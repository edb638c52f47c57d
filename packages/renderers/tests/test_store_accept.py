"""ImageStore puts with a caller's ``accept`` check: it sees the header size and runs before any write."""

import base64
import io
import uuid

import pytest
from PIL import Image

from mmref.renderers.errors import LayoutError
from mmref.renderers.layout import describe_image, layout_spec
from mmref.renderers.store import ImageStore


def png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (9, 8, 7)).save(buffer, "PNG")
    return buffer.getvalue()


def placeable(width, height):
    describe_image(layout_spec("qwen2-vl"), width, height)


@pytest.fixture(params=["local", "memory"])
def store_and_listing(request, tmp_path):
    if request.param == "local":
        return ImageStore(tmp_path / "s"), lambda: sorted(p.name for p in (tmp_path / "s").iterdir())
    store = ImageStore(f"memory://accept-{uuid.uuid4().hex}")
    return store, lambda: sorted(store.fs.ls(store.root, detail=False))


@pytest.mark.parametrize("put", ["bytes", "data_url", "image"])
def test_refused_by_accept_writes_nothing_not_even_a_temp_file(store_and_listing, put):
    store, listing = store_and_listing
    store.put_bytes(png((20, 10)), "image/png", accept=placeable)
    before = listing()
    data = png((402, 2))
    with pytest.raises(LayoutError, match="aspect ratio 201.0 > 200"):
        if put == "bytes":
            store.put_bytes(data, "image/png", accept=placeable)
        elif put == "data_url":
            store.put_data_url(f"data:image/png;base64,{base64.b64encode(data).decode()}", accept=placeable)
        else:
            store.put_image(Image.new("RGB", (402, 2)), accept=placeable)
    assert listing() == before and len(before) == 1


def test_accept_sees_the_header_size_and_an_accepted_image_is_stored(tmp_path):
    seen = []
    stored = ImageStore(tmp_path).put_bytes(png((37, 23)), "image/png", accept=lambda w, h: seen.append((w, h)))
    assert seen == [(37, 23)] and (stored.width, stored.height) == (37, 23) and not stored.deduplicated


@pytest.mark.parametrize("size", [(201, 1), (3, 700)])
def test_a_size_no_family_can_place_is_refused_without_accept_and_leaves_nothing(store_and_listing, size):
    store, listing = store_and_listing
    before = listing()
    with pytest.raises(LayoutError, match=r"asset [0-9a-f]{16}\.png: image .* aspect ratio .* > 200"):
        store.put_bytes(png(size), "image/png")
    assert listing() == before
