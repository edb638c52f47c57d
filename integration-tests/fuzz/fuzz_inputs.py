"""Atheris (libFuzzer) harness: untrusted strings and bytes raise only mmref's typed errors.

Targets, chosen by the first input byte: ``parse_ref`` on text, ``put_data_url`` on a data
URL (valid header + fuzzed payload, or fuzzed text), ``put_bytes`` on fuzzed bytes under
each media type followed by a verified read and decode. Any exception that is not an
``MMRefError`` is a crash. Seeds: one small valid image of each format, so mutations
reach the decoders. Run: ``python integration-tests/fuzz/fuzz_inputs.py -runs=20000``.
"""

from __future__ import annotations

import base64
import io
import sys
import tempfile
from contextlib import suppress

import atheris

with atheris.instrument_imports():
    from mmref.renderers.contract import make_ref
    from mmref.renderers.decode import decode_rgb
    from mmref.renderers.errors import MMRefError
    from mmref.renderers.layout import layout_spec
    from mmref.renderers.refs import parse_ref
    from mmref.renderers.store import ImageStore, StoreLimits

from PIL import Image  # noqa: E402

MEDIA_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"]
STORE = ImageStore(tempfile.mkdtemp(prefix="mmref-fuzz-"), limits=StoreLimits(max_bytes=2**20, max_pixels=2**20))
SPEC = layout_spec("qwen2-vl")


def seeds() -> list[bytes]:
    """One valid image per format, prefixed with the selector byte of the put_bytes target."""
    out = []
    for index, fmt in enumerate(["PNG", "JPEG", "WEBP", "GIF"]):
        buffer = io.BytesIO()
        Image.new("RGB", (9, 7), (200, 30, 60)).save(buffer, fmt)
        out.append(bytes([2, index]) + buffer.getvalue())
    return out


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    target, arg, body = data[0] % 3, data[1], data[2:]
    with suppress(MMRefError):  # the typed errors are the expected outcome; anything else crashes
        if target == 0:
            parse_ref(body.decode("utf-8", "replace"))
        elif target == 1:
            text = body.decode("utf-8", "replace")
            url = text if arg % 2 else f"data:{MEDIA_TYPES[arg // 2 % 4]};base64,{base64.b64encode(body).decode()}"
            STORE.put_data_url(url)
        else:
            stored = STORE.put_bytes(body, MEDIA_TYPES[arg % 4])
            ref = make_ref(SPEC, stored)
            decode_rgb(STORE.read(ref), ref)


def main() -> None:
    corpus = tempfile.mkdtemp(prefix="mmref-fuzz-corpus-")
    for index, seed in enumerate(seeds()):
        with open(f"{corpus}/seed{index}", "wb") as f:
            f.write(seed)
    atheris.Setup([*sys.argv, corpus], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
