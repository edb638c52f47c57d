"""prepare_images throughput vs its floor: base64 decode + sha256 + one file write.

Prints one JSON line: MB/s of data URLs through prepare_images, the floor's MB/s on the
same inputs, and their ratio (target >= 0.8), for unique images and for a body where each
image appears 4 times (dedup hits skip the write).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time

from mmref.client.images import prepare_images
from mmref.renderers import ImageStore, layout_spec
from mmref.trainer.demo import screenshot_png

SPEC = layout_spec("qwen2-vl")


def body_of(urls: list[str]) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}]} for u in urls]


def floor(urls: list[str], root: str) -> None:
    for url in urls:
        data = base64.b64decode(url.split(",", 1)[1], validate=True)
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(root, digest[:16])
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)


def throughput(fn, urls: list[str]) -> float:
    megabytes = sum(len(u) for u in urls) / 2**20
    best = float("inf")
    for _ in range(5):  # best of 5: disk and CPU noise on a shared 2-core machine
        root = tempfile.mkdtemp(prefix="mmref-bench-prepare-")
        start = time.perf_counter()
        fn(urls, root)
        best = min(best, time.perf_counter() - start)
    return megabytes / best


def prepared(urls: list[str], root: str) -> None:
    prepare_images(body_of(urls), ImageStore(root), SPEC)


def main() -> dict:
    # Screenshots with photo-like noise so files are realistically sized (~1-3 MB as PNG).
    import random

    from PIL import Image

    rng = random.Random(0)
    urls = []
    for i in range(16):
        image = Image.frombytes("RGB", (960, 540), rng.randbytes(960 * 540 * 3)) if i % 2 else None
        png = screenshot_png(1920, 1080, seed=i) if image is None else _png(image)
        urls.append("data:image/png;base64," + base64.b64encode(png).decode())
    result = {"benchmark": "prepare", "images": len(urls), "total_mb": round(sum(len(u) for u in urls) / 2**20, 2)}
    for name, inputs in (("unique", urls), ("dup4", urls[:4] * 4)):
        ours, base = throughput(prepared, inputs), throughput(floor, inputs)
        result[name] = {"prepare_mb_s": round(ours, 1), "floor_mb_s": round(base, 1), "ratio": round(ours / base, 3)}
    result["target_ratio"] = 0.8
    result["ok"] = min(result["unique"]["ratio"], result["dup4"]["ratio"]) >= 0.8
    return result


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


if __name__ == "__main__":
    print(json.dumps(main()))
