"""Inference server throughput with the feature cache on vs off, and request bytes on the wire.

Prints one JSON line: requests/s and p50/p95 latency for 64 concurrent 2-image requests
(720p screenshots, 8 distinct images) with the cache on and off, and the size of the same
request with refs vs with base64 float32 pixel_values (target >= 1000x smaller).
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration-tests"))

from mmref.renderers import ImageStore, make_ref  # noqa: E402
from mmref.trainer.demo import screenshot_png  # noqa: E402
from mmref.trainer.inference import create_app, load_served_model  # noqa: E402
from inference_cases import prompt_with_images  # noqa: E402

REQUESTS, IMAGES = 64, 8


async def blast(app, bodies) -> tuple[float, list[float]]:
    async def one(c, body):
        start = time.perf_counter()
        response = await c.post("/inference/v1/generate", json=body)
        assert response.status_code == 200, response.text
        return time.perf_counter() - start

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as c:
        start = time.perf_counter()
        latencies = await asyncio.gather(*(one(c, b) for b in bodies))
        return time.perf_counter() - start, latencies


def summary(wall: float, latencies: list[float]) -> dict:
    q = statistics.quantiles(latencies, n=20)
    return {"requests_per_s": round(len(latencies) / wall, 2), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(q[18], 3)}


def main() -> dict:
    served = load_served_model("tiny-qwen2-vl")
    store = ImageStore("memory://bench-inference")
    refs = [make_ref(served.spec, store.put_bytes(screenshot_png(1280, 720, seed=i), "image/png")) for i in range(IMAGES)]
    bodies = []
    for i in range(REQUESTS):
        ids, slots = prompt_with_images([refs[i % IMAGES], refs[(i + 1) % IMAGES]])
        # No seeds: as in RL, so the engine batches requests that wait together.
        bodies.append({"token_ids": ids, "images": slots, "sampling": {"max_tokens": 8}})
    results = {}
    for name, budget in (("cache_on", 1 << 30), ("cache_off", 0)):
        app = create_app(served, store, cache_bytes=budget)
        asyncio.run(blast(app, bodies[:2]))  # warm-up
        results[name] = summary(*asyncio.run(blast(app, bodies)))
        results[name]["images_processed"] = app.state.cache.stats.processed
    ref_bytes = len(json.dumps(bodies[0]).encode())
    pixels = [served.processor(images=[_decode(store, r)], return_tensors="pt")["pixel_values"] for r in refs[:2]]
    pixel_body = {**bodies[0], "pixel_values": [base64.b64encode(p.numpy().tobytes()).decode() for p in pixels]}
    pixel_bytes = len(json.dumps(pixel_body).encode())
    return {
        "benchmark": "inference", "requests": REQUESTS, "distinct_images": IMAGES, **results,
        "cache_speedup": round(results["cache_on"]["requests_per_s"] / results["cache_off"]["requests_per_s"], 2),
        "request_bytes_refs": ref_bytes, "request_bytes_pixel_values": pixel_bytes,
        "wire_ratio": round(pixel_bytes / ref_bytes), "target_wire_ratio": 1000,
        "ok": pixel_bytes / ref_bytes >= 1000,
    }


def _decode(store, ref):
    from mmref.renderers.decode import decode_rgb

    return decode_rgb(store.read(ref), ref)


if __name__ == "__main__":
    print(json.dumps(main()))
