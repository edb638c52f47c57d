"""The inference server over real loopback HTTP under 64 concurrent requests sharing 8 images."""

import asyncio
import os

import httpx
import psutil
import pytest

from mmref.trainer.inference.metrics import parse_metrics
from inference_cases import app_and_store, prompt_with_images, served, stored_refs
from live_server import running


@pytest.mark.timeout(300)
def test_64_concurrent_requests_share_8_images_each_processed_once():
    model = served("qwen2-vl")
    app, store = app_and_store(model)
    refs = stored_refs(model, store, 8)
    bodies = []
    for i in range(64):
        ids, slots = prompt_with_images([refs[i % 8], refs[(i + 3) % 8]])
        bodies.append({"token_ids": ids, "images": slots, "sampling": {"max_tokens": 4, "seed": i}})
    process = psutil.Process(os.getpid())
    with running(app) as url:
        async def blast():
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                return await asyncio.gather(*(c.post("/inference/v1/generate", json=b) for b in bodies))
        asyncio.run(blast())  # warm-up: model, allocator, caches
        rss_before = process.memory_info().rss
        responses = asyncio.run(blast())
        rss_growth_mb = (process.memory_info().rss - rss_before) / 2**20
        metrics = parse_metrics(httpx.get(f"{url}/metrics").text)
        models = httpx.get(f"{url}/v1/models").json()
    assert [r.status_code for r in responses] == [200] * 64
    assert all(r.json()["choices"][0]["token_ids"] for r in responses)
    assert metrics["mmref_images_processed_total"] == 8
    assert metrics["mmref_feature_cache_misses_total"] == 8
    assert metrics['mmref_requests_total{status="200"}'] == 128
    assert rss_growth_mb < 100, f"RSS grew {rss_growth_mb:.0f} MB over 64 warm requests"
    assert models["data"][0]["max_model_len"] == model.engine.max_model_len
