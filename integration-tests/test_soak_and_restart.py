"""Soak: many requests over a rotating image set (bounded RSS, cache within budget, no errors);
restart: the inference server goes away mid-rollout and comes back on the same port.

CI runs the soak with reduced counts; ``pytest -m slow`` runs the full 2,000 x 200.
"""

import asyncio
import os
import threading
import time

import httpx
import psutil
import pytest

from mmref.client.envs.color_codeword import ColorCodewordConfig, ColorCodewordEnv
from mmref.client.rollout import run_rollout
from mmref.client.train_client import Sampling, TrainClient
from mmref.renderers import ImageStore
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer
from mmref.trainer.inference import create_app
from mmref.trainer.inference.threaded import free_port, serve_in_thread
from inference_cases import app_and_store, prompt_with_images, served, stored_refs

BUDGET = 2 * 2**20  # far below 200 images' features: eviction runs all the time


def soak(requests: int, images: int) -> None:
    model = served("qwen2-vl")
    app, store = app_and_store(model, cache_bytes=BUDGET)
    refs = stored_refs(model, store, images, size=(96, 64))
    process = psutil.Process(os.getpid())

    async def wave(start: int, count: int) -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://soak", timeout=120) as c:
            async def one(i: int) -> int:
                ids, slots = prompt_with_images([refs[i % images], refs[(i * 7 + 1) % images]])
                r = await c.post("/inference/v1/generate",
                                 json={"token_ids": ids, "images": slots, "sampling": {"max_tokens": 1, "seed": i}})
                return r.status_code
            return await asyncio.gather(*(one(i) for i in range(start, start + count)))

    warm = requests // 5
    assert set(asyncio.run(wave(0, warm))) == {200}
    rss_before = process.memory_info().rss
    statuses = []
    for start in range(warm, requests, 50):
        statuses += asyncio.run(wave(start, min(50, requests - start)))
        assert app.state.cache.bytes <= BUDGET
    growth_mb = (process.memory_info().rss - rss_before) / 2**20
    assert set(statuses) == {200}, f"errors: {[s for s in statuses if s != 200][:5]}"
    assert app.state.cache.stats.evictions > 0
    assert growth_mb < 150, f"RSS grew {growth_mb:.0f} MB after warm-up"


@pytest.mark.timeout(600)
def test_soak_reduced_rotating_images_no_errors_bounded_memory():
    soak(requests=300, images=60)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_full_2000_requests_200_images():
    soak(requests=2000, images=200)


@pytest.mark.timeout(300)
def test_rollout_survives_an_inference_server_restart(tmp_path):
    store = ImageStore(tmp_path)
    model = served("qwen2-vl")
    renderer = create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=model.spec)
    port = free_port()
    first = serve_in_thread(create_app(model, store), port=port)
    url = first.__enter__()
    restarted = threading.Event()

    def restart():  # down for ~1 s mid-rollout, then back on the same port
        first.__exit__(None, None, None)
        time.sleep(1.0)
        with serve_in_thread(create_app(model, store), port=port):
            restarted.set()
            time.sleep(60)

    class RestartingEnv(ColorCodewordEnv):
        def step(self, text):
            if len(self.targets) == 1:
                threading.Thread(target=restart, daemon=True).start()
                time.sleep(0.3)  # the next request meets a dead port
            return super().step(text)

    async def go():
        async with TrainClient(url, max_retries=6, backoff_s=0.25) as client:
            trace = await run_rollout(RestartingEnv(ColorCodewordConfig(turns=3), seed=1), renderer, client, store,
                                      Sampling(max_tokens=3))
            return trace, client.retries
    trace, retries = asyncio.run(go())
    assert restarted.is_set() and len(trace.nodes) == 3 and retries >= 1


@pytest.mark.timeout(120)
def test_rollout_fails_clearly_when_the_server_stays_down(tmp_path):
    from mmref.client.errors import InferenceUnavailableError

    store = ImageStore(tmp_path)
    model = served("qwen2-vl")
    renderer = create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=model.spec)

    async def go():
        async with TrainClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff_s=0.05) as client:
            await run_rollout(ColorCodewordEnv(seed=0), renderer, client, store, Sampling(max_tokens=2))
    with pytest.raises(InferenceUnavailableError, match="after 3 attempts"):
        asyncio.run(go())
