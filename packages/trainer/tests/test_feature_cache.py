"""Feature cache: byte budget with LRU, single-flight, no cached failures, forged refs."""

import asyncio
import threading
import time

import pytest
import torch

from mmref.renderers.errors import ContractMismatchError
from mmref.trainer.inference.feature_cache import FeatureCache
from mmref.trainer.pixels import ImageFeatures
from mmref.renderers import layout_spec, make_ref
from mmref.renderers.store import StoredImage


def ref(i: int, width: int = 64):
    sha = f"{i:064x}"
    return make_ref(layout_spec("qwen2-vl"), StoredImage(f"{sha[:16]}.png", sha, "image/png", width, 48, 10))


def features(r, nbytes=4000):
    t, h, w = r.grid_thw
    return ImageFeatures(torch.zeros(nbytes // 4 // (t * h * w) * (t * h * w)).view(t * h * w, -1), r.grid_thw)


def test_lru_eviction_keeps_bytes_within_budget():
    async def run():
        cache = FeatureCache(budget_bytes=10_000)
        for i in range(5):
            await cache.get(ref(i), lambda i=i: features(ref(i)))
        return cache
    cache = asyncio.run(run())
    assert cache.bytes <= 10_000 and len(cache) == 2 and cache.stats.evictions == 3


def test_concurrent_requests_for_one_image_compute_once():
    calls = []

    def slow():
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return features(ref(1))

    async def run():
        cache = FeatureCache(10**7)
        results = await asyncio.gather(*(cache.get(ref(1), slow) for _ in range(16)))
        return cache, results
    cache, results = asyncio.run(run())
    assert len(calls) == 1 and all(r is results[0] for r in results)
    assert (cache.stats.misses, cache.stats.hits) == (1, 15)


def test_failures_are_not_cached():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("transient read error")
        return features(ref(2))

    async def run():
        cache = FeatureCache(10**7)
        with pytest.raises(OSError):
            await cache.get(ref(2), flaky)
        return await cache.get(ref(2), flaky)
    assert asyncio.run(run()).grid_thw == ref(2).grid_thw and len(attempts) == 2


def test_forged_ref_with_another_geometry_never_gets_the_cached_features():
    real, forged = ref(3, width=64), ref(3, width=640)
    assert real.sha256 == forged.sha256 and real.grid_thw != forged.grid_thw

    async def run():
        cache = FeatureCache(10**7)
        await cache.get(real, lambda: features(real))
        await cache.get(forged, lambda: features(forged))
    with pytest.raises(ContractMismatchError, match="does not match the stored image's grid"):
        asyncio.run(run())
