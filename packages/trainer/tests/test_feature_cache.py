"""Feature cache: byte budget with LRU, single-flight, no cached failures, and the same answer warm or cold."""

import asyncio
import io
import threading
import time
import uuid

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmref.renderers import layout_spec, make_ref
from mmref.renderers.errors import ContractMismatchError
from mmref.renderers.refs import asset_name
from mmref.renderers.store import ImageStore, StoredImage
from mmref.trainer.inference.feature_cache import FeatureCache
from mmref.trainer.pixels import ImageFeatures

SPEC = layout_spec("qwen2-vl", max_pixels=256 * 28 * 28)
SIZES = [(64, 48), (90, 61), (200, 150), (57, 300)]


def png(index: int, size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40 * index % 256, 7, 99)).save(buffer, "PNG")
    return buffer.getvalue()


def new_store() -> tuple[ImageStore, list]:
    """A store holding one PNG per size; returns it and each image's valid ref."""
    store = ImageStore(f"memory://feature-cache-{uuid.uuid4().hex}")
    return store, [make_ref(SPEC, store.put_bytes(png(i, size), "image/png")) for i, size in enumerate(SIZES)]


def features(data: bytes, actual, nbytes: int = 4000) -> ImageFeatures:
    """A stand-in for the processor: a tensor of about ``nbytes`` rows per grid patch."""
    t, h, w = actual.grid_thw
    return ImageFeatures(torch.zeros(t * h * w, max(1, nbytes // 4 // (t * h * w))), actual.grid_thw)


def edited(ref, **facts):
    """``ref`` remade as a producer would for other facts: grid and token count stay self-consistent."""
    fields = {k: getattr(ref, k) for k in ("asset", "sha256", "media_type", "width", "height")} | facts
    fields["asset"] = facts.get("asset", asset_name(fields["sha256"], fields["media_type"]))
    return make_ref(SPEC, StoredImage(nbytes=1, **fields))


def test_lru_eviction_keeps_bytes_within_budget():
    store, refs = new_store()

    async def run():
        cache = FeatureCache(10_000, store, SPEC)
        for ref in refs:
            await cache.get(ref, features)
        return cache
    cache = asyncio.run(run())
    assert cache.bytes <= 10_000 and len(cache) == 2 and cache.stats.evictions == 2


def test_concurrent_requests_for_one_image_compute_once():
    store, refs = new_store()
    calls = []

    def slow(data, actual):
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return features(data, actual)

    async def run():
        cache = FeatureCache(10**7, store, SPEC)
        results = await asyncio.gather(*(cache.get(refs[1], slow) for _ in range(16)))
        return cache, results
    cache, results = asyncio.run(run())
    assert len(calls) == 1 and all(r is results[0] for r in results)
    assert (cache.stats.misses, cache.stats.hits) == (1, 15)


def test_failures_are_not_cached():
    store, refs = new_store()
    attempts = []

    def flaky(data, actual):
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("transient read error")
        return features(data, actual)

    async def run():
        cache = FeatureCache(10**7, store, SPEC)
        with pytest.raises(OSError):
            await cache.get(refs[2], flaky)
        return await cache.get(refs[2], flaky)
    assert asyncio.run(run()).grid_thw == refs[2].grid_thw and len(attempts) == 2


def test_forged_ref_with_another_geometry_never_gets_the_cached_features():
    store, refs = new_store()
    real = refs[0]
    forged = edited(real, width=640)
    assert real.sha256 == forged.sha256 and real.grid_thw != forged.grid_thw

    async def run():
        cache = FeatureCache(10**7, store, SPEC)
        await cache.get(real, features)
        await cache.get(forged, features)
    with pytest.raises(ContractMismatchError, match=r"width 640 \(ref\) != 64 \(stored image\).*grid_thw"):
        asyncio.run(run())


@pytest.mark.parametrize("facts", [{"width": 65}, {"height": 47}], ids=["width", "height"])
def test_edited_size_that_keeps_the_grid_is_refused_warm_as_cold(facts):
    store, refs = new_store()
    forged = edited(refs[0], **facts)
    assert forged.grid_thw == refs[0].grid_thw and forged != refs[0]

    async def run(warm: bool):
        cache = FeatureCache(10**7, store, SPEC)
        if warm:
            await cache.get(refs[0], features)
        with pytest.raises(ContractMismatchError) as caught:
            await cache.get(forged, features)
        return str(caught.value)
    cold, warm = asyncio.run(run(False)), asyncio.run(run(True))
    name, value = next(iter(facts.items()))
    assert cold == warm and f"{name} {value} (ref) != {getattr(refs[0], name)} (stored image)" in cold


def test_wrong_media_type_is_refused_even_where_the_bytes_sit_under_its_name():
    store, refs = new_store()
    real = refs[0]
    as_jpeg = edited(real, media_type="image/jpeg")
    store.fs.pipe_file(store.resolve(as_jpeg.asset), store.read(real))  # a stray copy under the .jpg name

    async def run():
        cache = FeatureCache(10**7, store, SPEC)
        await cache.get(real, features)
        await cache.get(as_jpeg, features)
    with pytest.raises(ContractMismatchError, match=r"media_type image/jpeg \(ref\) != image/png \(stored image\)"):
        asyncio.run(run())


# ---- cache on vs cache off: the same answer for every request of any sequence ----------------------------

TAMPERINGS = ["valid", "width+", "width-", "height+", "height-", "grid", "num_tokens", "sha_tail", "sha_head",
              "media_type", "media_type_copy", "fingerprint", "missing"]


def tampered(store, refs, index: int, how: str, delta: int):
    ref = refs[index]
    if how == "valid":
        return ref
    if how in ("width+", "width-", "height+", "height-"):
        name = how[:-1]
        return edited(ref, **{name: getattr(ref, name) + (delta if how.endswith("+") else -delta)})
    if how == "grid":
        t, h, w = ref.grid_thw
        return ref.model_copy(update={"grid_thw": (t, h + delta, w)})
    if how == "num_tokens":
        return ref.model_copy(update={"num_tokens": ref.num_tokens + delta})
    if how == "sha_tail":  # same asset name, wrong full hash
        return edited(ref, sha256=ref.sha256[:-1] + ("0" if ref.sha256[-1] != "0" else "1"))
    if how == "sha_head":  # another asset name altogether
        return edited(ref, sha256=("0" if ref.sha256[0] != "0" else "1") + ref.sha256[1:])
    if how in ("media_type", "media_type_copy"):
        return edited(ref, media_type="image/webp" if how == "media_type" else "image/jpeg")
    if how == "fingerprint":
        return make_ref(SPEC.replace(max_pixels=SPEC.max_pixels + 28 * 28 * delta), StoredImage(
            ref.asset, ref.sha256, ref.media_type, ref.width, ref.height, 1))
    assert how == "missing"
    sha = f"{delta:064x}"
    return edited(ref, sha256=sha)


def outcome(result):
    if isinstance(result, BaseException):
        return type(result).__name__, str(result)
    return "ok", result.grid_thw, tuple(result.pixel_values.shape)


requests = st.lists(st.tuples(st.integers(0, len(SIZES) - 1), st.sampled_from(TAMPERINGS), st.integers(1, 3)),
                    min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(requests, min_size=1, max_size=5), budget=st.sampled_from([10**8, 9_000]))
def test_cache_on_and_off_give_the_same_answer_to_any_request_sequence(batches, budget):
    store, refs = new_store()
    # A stray copy of image 0 under its .jpg name: a forged media type then finds bytes to compare with.
    store.fs.pipe_file(store.resolve(asset_name(refs[0].sha256, "image/jpeg")), store.read(refs[0]))

    async def with_cache():
        cache = FeatureCache(budget, store, SPEC)
        answers = []
        for batch in batches:  # each batch concurrently, as one request's images are
            ref_batch = [tampered(store, refs, *r) for r in batch]
            answers += await asyncio.gather(*(cache.get(r, features) for r in ref_batch), return_exceptions=True)
        return [outcome(a) for a in answers], cache

    async def without_cache():
        answers = []
        for batch in batches:
            for r in batch:
                try:
                    answers.append(await FeatureCache(0, store, SPEC).get(tampered(store, refs, *r), features))
                except Exception as exc:
                    answers.append(exc)
        return [outcome(a) for a in answers]

    warm, cache = asyncio.run(with_cache())
    cold = asyncio.run(without_cache())
    assert warm == cold
    flat = [r for batch in batches for r in batch]
    valid = [o for o, (_, how, _) in zip(cold, flat) if how == "valid"]
    assert all(o[0] == "ok" for o in valid)
    assert all(o[0] != "ok" for o, (_, how, _) in zip(cold, flat) if how != "valid")
