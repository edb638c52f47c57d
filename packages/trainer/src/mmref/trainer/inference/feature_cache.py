"""Processed image features (or decoded images, for vLLM), cached per stored image under a byte budget.

Same request, same answer: a warm cache refuses exactly what a cold one refuses.

- The key names the bytes only: ``(asset, sha256)``. An entry is made from those bytes
  alone: read and hash-verified, ``actual`` = the ref they make under this server's spec
  (size and media type from the header, grid and token count from the layout math),
  then processed with ``actual``. Nothing in the requesting ref shapes an entry.
- Every lookup, hit or miss, then runs the one check ``verify_ref_against_image(ref,
  actual)``: an edited width that keeps the grid, another grid, a foreign fingerprint or a
  wrong media type is refused with the same error text whether the entry was warm or not.
- LRU eviction once the budget is exceeded; an entry larger than the budget is not kept.
- Single-flight: concurrent requests for one image await one computation (it does not
  depend on which ref asked, so a forged ref cannot poison a valid one's wait).
- Failures are never cached: the next request retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from mmref.renderers.contract import verify_ref_against_image
from mmref.renderers.layout import LayoutSpec
from mmref.renderers.refs import RawImageRef
from mmref.renderers.store import ImageStore
from mmref.trainer.byte_lru import ByteLRU
from mmref.trainer.pixels import DecodedImage, ImageFeatures, StoredEntry, stored_image_ref

Cached = ImageFeatures | DecodedImage
# Turns hash-verified bytes into what the engine consumes, given the ref the bytes make.
Compute = Callable[[bytes, RawImageRef], Cached]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    processed: int = 0
    evictions: int = 0


class FeatureCache:
    """An asyncio-side LRU of features per stored image; reading and processing run in a worker thread.

    >>> cache = FeatureCache(512 * 2**20, store, served.spec)                 # doctest: +SKIP
    >>> await cache.get(ref, lambda data, actual: decoded_image(data, actual, processor))  # doctest: +SKIP
    """

    def __init__(self, budget_bytes: int, store: ImageStore, spec: LayoutSpec, stage: str = "inference server") -> None:
        self.stats = CacheStats()
        self.store, self.spec, self.stage = store, spec, stage
        self._entries: ByteLRU[StoredEntry] = ByteLRU(budget_bytes)
        self._inflight: dict[tuple[str, str], asyncio.Future[StoredEntry]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    async def get(self, ref: RawImageRef, compute: Compute) -> Cached:
        """Features of ``ref``'s image (cached, awaited from an in-flight computation, or computed now), once
        ``ref`` passes the check against what the bytes say; raises ``ContractMismatchError`` otherwise."""
        entry = await self._entry(ref.asset, ref.sha256, compute)
        verify_ref_against_image(ref, entry.actual, self.spec, self.stage)
        return entry.value

    async def _entry(self, asset: str, sha256: str, compute: Compute) -> StoredEntry:
        key = (asset, sha256)
        cached = self._entries.get(key)
        if cached is not None:
            self.stats.hits += 1
            return cached
        if key in self._inflight:
            self.stats.hits += 1
            return await asyncio.shield(self._inflight[key])
        self.stats.misses += 1
        future: asyncio.Future[StoredEntry] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            entry = await asyncio.to_thread(self._make_entry, asset, sha256, compute)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it; nothing is cached
            raise
        finally:
            self._inflight.pop(key, None)
        self.stats.processed += 1
        future.set_result(entry)
        self._entries.put(key, entry)
        self.stats.evictions = self._entries.evictions
        return entry

    def _make_entry(self, asset: str, sha256: str, compute: Compute) -> StoredEntry:
        actual, data = stored_image_ref(self.store, self.spec, asset, sha256)
        return StoredEntry(actual, compute(data, actual))
