"""prepare_images: canonical ref parts, idempotence, stats, and every refusal."""

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from mmref.client.errors import ImageInputError
from mmref.client.images import prepare_images
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.refs import parse_ref

SPEC = layout_spec("qwen2-vl")


def png_url(color=(10, 20, 30), size=(40, 30), media="image/png"):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return f"data:{media};base64,{base64.b64encode(buffer.getvalue()).decode()}"


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path)


def test_openai_and_hf_parts_become_canonical_refs(store):
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": png_url(), "detail": "high"}},
        {"type": "image", "image": Image.new("RGB", (50, 20), (1, 1, 1))}]}], "temperature": 0.5}
    out, stats = prepare_images(body, store, SPEC)
    parts = out["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "a"} and out["temperature"] == 0.5 and out["model"] == "m"
    refs = [parse_ref(p["image_url"]["url"]) for p in parts[1:]]
    assert [(r.width, r.height) for r in refs] == [(40, 30), (50, 20)]
    assert all(p == {"type": "image_url", "image_url": {"url": p["image_url"]["url"]}} for p in parts[1:])
    assert (stats.images, stats.written, stats.dedup_hits) == (2, 2, 0) and stats.bytes > 0


def test_idempotent_and_dedup_counted(store):
    body = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}}]}] * 2
    once, stats = prepare_images(body, store, SPEC)
    assert (stats.written, stats.dedup_hits) == (1, 1)
    twice, again = prepare_images(once, store, SPEC)
    assert twice == once and again.already_refs == 2 and again.written == 0


def test_tuples_and_nested_structures_are_walked(store):
    out, stats = prepare_images(({"x": [{"type": "image_url", "image_url": {"url": png_url()}}]},), store, SPEC)
    assert isinstance(out, tuple) and stats.images == 1 and out[0]["x"][0]["image_url"]["url"].startswith("mmref:v1:")


@pytest.mark.parametrize("url,needle", [
    ("https://example.com/a.png", "never fetched"),
    ("http://10.0.0.1/a.png", "never fetched"),
    ("file:///etc/passwd", "never fetched"),
    ("/home/user/a.png", "local path"),
    ("data:image/png;base64,%%%%", "not strict base64"),
    ("data:image/png;base64,AAAAAAA", "not strict base64"),      # missing padding
    ("data:image/png;base64,AAAA\nAAAA", "not strict base64"),    # embedded newline
    ("data:image/pngAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "data:image"),  # no comma: the head must not leak payload
    ("data:image/tiff;base64,AAAA", "unsupported media type"),
    ("data:text/html;base64,AAAA", "data:image"),
])
def test_refused_sources_name_the_problem_without_the_payload(store, url, needle):
    with pytest.raises(ImageInputError, match=needle) as info:
        prepare_images([{"type": "image_url", "image_url": {"url": url}}], store, SPEC)
    assert "%%%%" not in str(info.value) and "AAAA" not in str(info.value)


@pytest.mark.parametrize("part,needle", [
    ({"type": "image_url"}, "needs an object"),
    ({"type": "image_url", "image_url": 5}, "needs an object"),
    ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, "needs an object"),  # no string shorthand
    ({"type": "image_url", "image_url": {"detail": "high"}}, "needs an object"),
    ({"type": "image", "image": 42}, "must be a data URL, a PIL image or an mmref ref"),
])
def test_malformed_parts_are_refused(store, part, needle):
    with pytest.raises(ImageInputError, match=needle):
        prepare_images([part], store, SPEC)


def test_oversized_and_mismatched_images_are_refused(tmp_path):
    from mmref.renderers.store import StoreLimits

    small = ImageStore(tmp_path / "small", StoreLimits(max_bytes=100))
    with pytest.raises(ImageInputError, match="exceeds the limit"):
        prepare_images([{"type": "image_url", "image_url": {"url": png_url(size=(300, 300))}}], small, SPEC)
    with pytest.raises(ImageInputError, match="declared media type image/jpeg but the bytes are image/png"):
        prepare_images([{"type": "image_url", "image_url": {"url": png_url(media="image/jpeg")}}],
                       ImageStore(tmp_path / "s2"), SPEC)


def test_ref_missing_from_store_or_from_another_layout_is_refused(tmp_path):
    (part,), _ = prepare_images([{"type": "image_url", "image_url": {"url": png_url()}}], ImageStore(tmp_path / "a"), SPEC)
    with pytest.raises(ImageInputError, match="is not in store"):
        prepare_images([part], ImageStore(tmp_path / "b"), SPEC)
    with pytest.raises(ImageInputError, match="fingerprint"):
        prepare_images([part], ImageStore(tmp_path / "a"), layout_spec("qwen2-vl", max_pixels=64 * 64))


def _store_contents(root) -> dict:
    """Every file under the store root (temp files included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _png_bytes(size, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def _url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


REFUSED = [
    ("aspect ratio 201 (data URL)", lambda: _url(_png_bytes((201, 1))), "aspect ratio 201.0 > 200"),
    ("aspect ratio 250, tall (data URL)", lambda: _url(_png_bytes((2, 500))), "aspect ratio 250.0 > 200"),
    ("aspect ratio 300 (PIL image)", lambda: Image.new("RGB", (300, 1)), "aspect ratio 300.0 > 200"),
    ("too many pixels", lambda: _url(_png_bytes((101, 100), mode="1")), "exceeds the limit of 10000"),
    ("too many pixels (PIL image)", lambda: Image.new("1", (200, 60)), "exceeds the limit of 10000"),
    ("corrupt header", lambda: _url(_png_bytes((40, 30))[:16] + b"\x00" * 40), "corrupt image/png header"),
    ("not an image", lambda: _url(b"GIF89a" + b"\xff" * 10, media="image/png"), "bytes are image/gif"),
    ("truncated magic", lambda: _url(b"\x89PNG\r\n"), "not a PNG, JPEG, WebP or GIF"),
]


@pytest.mark.parametrize("source,needle", [(s, n) for _, s, n in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_refused_image_leaves_the_store_exactly_as_before(tmp_path, source, needle):
    from mmref.renderers.store import StoreLimits

    root = tmp_path / "store"
    store = ImageStore(root, StoreLimits(max_pixels=100 * 100))
    prepare_images([{"type": "image_url", "image_url": {"url": png_url()}}], store, SPEC)  # one asset already there
    before = _store_contents(root)
    assert len(before) == 1
    source = source()
    part = {"type": "image", "image": source} if isinstance(source, Image.Image) else \
        {"type": "image_url", "image_url": {"url": source}}
    with pytest.raises(ImageInputError, match=needle):
        prepare_images({"messages": [{"role": "user", "content": [part]}]}, store, SPEC)
    assert _store_contents(root) == before


def test_a_refused_image_in_a_body_stores_none_of_it_before_it(tmp_path):
    # The first image is fine, the second refused: the fine one was stored (content-addressed, harmless),
    # the refused one left nothing, and a retry without it dedups against what is there.
    root = tmp_path / "store"
    store = ImageStore(root)
    body = [{"type": "image_url", "image_url": {"url": png_url()}},
            {"type": "image_url", "image_url": {"url": _url(_png_bytes((1000, 4)))}}]
    with pytest.raises(ImageInputError, match="aspect ratio 250.0 > 200"):
        prepare_images(body, store, SPEC)
    assert list(_store_contents(root)) == [parse_ref(prepare_images(body[:1], store, SPEC)[0][0]["image_url"]["url"]).asset]


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "dataset"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(root / "images" / "a.png")
    (root / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "secret.png").write_bytes((root / "images" / "a.png").read_bytes())
    return root


def test_paths_under_the_image_root_are_read_by_the_client_as_the_same_bytes_a_data_url_gives(tmp_path, image_root):
    store = ImageStore(tmp_path / "store")
    body = [{"type": "image", "image": Path("images/a.png")},
            {"type": "image_url", "image_url": {"url": "images/a.png"}}]
    out, stats = prepare_images(body, store, SPEC, image_root=image_root)
    same, _ = prepare_images([{"type": "image_url", "image_url": {"url": png_url()}}], store, SPEC)
    assert out[0] == out[1] == same[0] and stats.images == 2


@pytest.mark.parametrize("name, match", [
    ("../secret.png", r"'\.\./secret\.png' leaves the image root"),
    ("images/missing.png", r"cannot read image 'images/missing\.png'"),
    ("images/notes.txt", r"is no PNG, JPEG, GIF or WebP image"),
])
def test_paths_that_leave_the_root_are_missing_or_no_image_are_refused(tmp_path, image_root, name, match):
    with pytest.raises(ImageInputError, match=match):
        prepare_images([{"type": "image", "image": name}], ImageStore(tmp_path / "store"), SPEC, image_root=image_root)
    assert not list((tmp_path / "store").glob("*.png"))


def test_a_path_without_an_image_root_is_refused(store):
    with pytest.raises(ImageInputError, match="local path"):
        prepare_images([{"type": "image", "image": "images/a.png"}], store, SPEC)
