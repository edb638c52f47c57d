"""Layout math vs the transformers image processor, and ref size vs pixel_values size.

Prints one JSON line. Targets: describe_image >= 10,000x faster than a processor call on
the same 1080p image; an encoded ref <= 512 bytes.
"""

from __future__ import annotations

import json
import tempfile
import time

from PIL import Image

from mmref.renderers import ImageStore, describe_image, layout_spec, make_ref
from mmref.trainer.demo import SCREENSHOTS, pixel_values_bytes, screenshot_png
from mmref.trainer.models import build_image_processor


def ns_per_call(fn, min_seconds: float) -> float:
    """Mean wall ns per call of ``fn``, repeated for at least ``min_seconds``."""
    calls, start = 0, time.perf_counter_ns()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter_ns() - start
        if elapsed >= min_seconds * 1e9:
            return elapsed / calls


def main() -> dict:
    spec = layout_spec("qwen2-vl")
    processor = build_image_processor(spec)
    image = Image.new("RGB", (1920, 1080), (120, 80, 40))
    layout_ns = ns_per_call(lambda: describe_image(spec, 1920, 1080), 0.5)
    processor_ns = ns_per_call(lambda: processor(images=[image]), 2.0)
    store = ImageStore(tempfile.mkdtemp(prefix="mmref-bench-"))
    sizes = {}
    for name, (width, height) in SCREENSHOTS.items():
        ref = make_ref(spec, store.put_bytes(screenshot_png(width, height), "image/png"))
        sizes[name] = {"ref_bytes": len(ref.encode()), "pixel_values_bytes": pixel_values_bytes("qwen2-vl", width, height)}
    result = {
        "benchmark": "layout",
        "describe_image_ns": round(layout_ns),
        "processor_call_ns_1080p": round(processor_ns),
        "speedup_vs_processor": round(processor_ns / layout_ns),
        "target_speedup": 10_000,
        "sizes": sizes,
        "max_ref_bytes": max(s["ref_bytes"] for s in sizes.values()),
        "target_max_ref_bytes": 512,
    }
    result["ok"] = result["speedup_vs_processor"] >= 10_000 and result["max_ref_bytes"] <= 512
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
