"""The content-addressed image store: round trips, limits, integrity, path safety, atomicity."""

import base64
import io
import os
import threading

import pytest
from PIL import Image

from mmref.renderers.errors import (
    AssetNotFoundError,
    IntegrityError,
    InvalidImageError,
    PathEscapeError,
    StoreWriteError,
)
from mmref.renderers.store import ImageStore, StoreLimits, sniff_media_type


def encode(size=(32, 24), fmt="PNG", color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data, media_type="image/png"):
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    root = tmp_path / "store" if request.param == "local" else f"memory://mmref-test-{id(request)}"
    return ImageStore(root)


@pytest.mark.parametrize("fmt,media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                            ("WEBP", "image/webp"), ("GIF", "image/gif")])
def test_put_read_round_trip_per_format(store, fmt, media_type):
    data = encode(fmt=fmt)
    stored = store.put_bytes(data, media_type)
    assert (stored.width, stored.height, stored.media_type, stored.nbytes) == (32, 24, media_type, len(data))
    assert stored.asset.startswith(stored.sha256[:16])
    assert store.read(stored.asset, stored.sha256) == data


def test_same_bytes_give_same_asset_and_dedup(store):
    data = encode()
    first, second = store.put_bytes(data, "image/png"), store.put_data_url(data_url(data))
    assert first.asset == second.asset and not first.deduplicated and second.deduplicated


def test_tampered_file_is_detected(tmp_path):
    store = ImageStore(tmp_path)
    stored = store.put_bytes(encode(), "image/png")
    (tmp_path / stored.asset).write_bytes(encode(color=(0, 0, 255)))
    with pytest.raises(IntegrityError, match=f"asset {stored.asset}.*expected sha256 {stored.sha256}"):
        store.read(stored.asset, stored.sha256)


def test_missing_asset_is_named(store):
    with pytest.raises(AssetNotFoundError, match="0123456789abcdef.png"):
        store.read("0123456789abcdef.png", "0" * 64)


@pytest.mark.parametrize("asset", ["../0123456789abcdef.png", "/etc/passwd", "a/0123456789abcdef.png"])
def test_escaping_asset_ids_are_refused(store, asset):
    with pytest.raises(PathEscapeError):
        store.read(asset, "0" * 64)


def test_symlink_pointing_outside_root_is_refused(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(encode())
    store = ImageStore(tmp_path / "store")
    os.symlink(outside, tmp_path / "store" / "0123456789abcdef.png")
    with pytest.raises(PathEscapeError, match="outside store root"):
        store.read("0123456789abcdef.png", "0" * 64)


@pytest.mark.parametrize("url,needle", [
    ("https://example.com/cat.png", "data:image"),
    ("file:///etc/passwd", "data:image"),
    ("data:text/plain;base64,aGk=", "data:image"),
    ("data:image/bmp;base64,aGk=", "unsupported media type 'image/bmp'"),
    ("data:image/png;base64,@@@@", "not strict base64"),
    ("data:image/png;base64,aGk", "not strict base64"),
])
def test_bad_data_urls_are_typed_errors_without_payload(store, url, needle):
    with pytest.raises(InvalidImageError, match=needle) as info:
        store.put_data_url(url)
    assert "@@@@" not in str(info.value) and "aGk" not in str(info.value)


def test_declared_type_must_match_bytes(store):
    with pytest.raises(InvalidImageError, match="declared media type image/jpeg but the bytes are image/png"):
        store.put_bytes(encode(), "image/jpeg")


def test_non_image_and_corrupt_header_are_refused(store):
    with pytest.raises(InvalidImageError, match="not a PNG, JPEG, WebP or GIF"):
        store.put_bytes(b"hello world", "image/png")
    with pytest.raises(InvalidImageError, match="corrupt image/png header"):
        store.put_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "image/png")


def test_size_and_pixel_limits_are_configurable(tmp_path):
    data = encode(size=(100, 100))
    with pytest.raises(InvalidImageError, match="exceeds the limit of 50 bytes"):
        ImageStore(tmp_path / "a", StoreLimits(max_bytes=50)).put_bytes(data, "image/png")
    with pytest.raises(InvalidImageError, match="100x100 = 10000 pixels exceeds the limit of 9999"):
        ImageStore(tmp_path / "b", StoreLimits(max_pixels=9999)).put_bytes(data, "image/png")
    with pytest.raises(InvalidImageError, match="exceeds the limit of 50 bytes"):
        ImageStore(tmp_path / "c", StoreLimits(max_bytes=50)).put_data_url(data_url(data))


def test_decompression_bomb_dimensions_refused_before_decode(tmp_path):
    # A 20000x20000 1-bit PNG compresses to a few KB; only the header is read.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    with pytest.raises(InvalidImageError, match="decompression-bomb guard"):
        ImageStore(tmp_path).put_bytes(buffer.getvalue(), "image/png")
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG")  # under PIL's guard, over ours (8192^2)
    with pytest.raises(InvalidImageError, match="9000x9000 = 81000000 pixels exceeds the limit"):
        ImageStore(tmp_path).put_bytes(buffer.getvalue(), "image/png")


def test_concurrent_writers_of_same_bytes_leave_one_complete_file(tmp_path):
    store, data = ImageStore(tmp_path), encode(size=(300, 200))
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.put_bytes(data, "image/png"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len({r.asset for r in results}) == 1 and len(results) == 16
    assert os.listdir(tmp_path) == [results[0].asset]
    assert store.read(results[0].asset, results[0].sha256) == data


def test_failed_write_leaves_no_partial_asset(tmp_path, monkeypatch):
    store = ImageStore(tmp_path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StoreWriteError, match=r"could not write asset [0-9a-f]{16}\.png .*No space left"):
        store.put_bytes(encode(), "image/png")
    assert os.listdir(tmp_path) == []


def test_sniff_media_type():
    assert sniff_media_type(encode(fmt="WEBP")) == "image/webp"
    assert sniff_media_type(b"GIF89a....") == "image/gif"
    assert sniff_media_type(b"BM....") is None
