"""The inference server answers the same request the same way with a warm feature cache, a cold one, or none."""

import asyncio

import pytest

from mmref.renderers import make_ref
from mmref.renderers.store import StoredImage
from mmref.trainer.inference import create_app
from inference_cases import app_and_store, client, prompt_with_images, served, stored_refs


@pytest.fixture(scope="module")
def model():
    return served("qwen2-vl")


def post(app, refs):
    ids, slots = prompt_with_images(refs)

    async def call():
        async with client(app) as c:
            return await c.post("/inference/v1/generate", json={"token_ids": ids, "images": slots,
                                                                "sampling": {"max_tokens": 2, "temperature": 0}})
    response = asyncio.run(call())
    return response.status_code, response.json()


@pytest.mark.parametrize("facts", [{"width": 65}, {"height": 50}], ids=["width", "height"])
def test_edited_size_keeping_the_grid_is_a_400_with_cache_warm_cold_or_off(model, facts):
    app, store = app_and_store(model)
    (real,) = stored_refs(model, store, 1)
    forged = make_ref(model.spec, StoredImage(real.asset, real.sha256, real.media_type,
                                              facts.get("width", real.width), facts.get("height", real.height), 1))
    assert forged.grid_thw == real.grid_thw and forged != real
    cold = post(app, [forged])
    assert post(app, [real])[0] == 200  # now the image is cached
    warm = post(app, [forged])
    off = post(create_app(model, store, cache_bytes=0), [forged])
    assert cold == warm == off and cold[0] == 400, (cold, warm, off)
    name, value = next(iter(facts.items()))
    assert f"{name} {value} (ref) != {getattr(real, name)} (stored image)" in cold[1]["error"]["message"]
    assert app.state.cache.stats.hits >= 1
