"""Processed image features (or decoded images, for vLLM), cached by (sha256, layout fingerprint)
under a byte budget.

- LRU eviction once the budget is exceeded; an entry larger than the budget is not kept.
- Single-flight: concurrent requests for one image await one computation.
- Failures are never cached: the next request retries.
- A hit is only returned for a ref whose grid equals the cached entry's, so a forged ref
  (another image's hash claimed with other geometry) never receives that image's features.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from mmref.renderers.errors import ContractMismatchError
from mmref.renderers.refs import RawImageRef
from mmref.trainer.byte_lru import ByteLRU
from mmref.trainer.pixels import DecodedImage, ImageFeatures

Cached = ImageFeatures | DecodedImage


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    processed: int = 0
    evictions: int = 0


class FeatureCache:
    """An asyncio-side LRU of ``ImageFeatures``; computation runs in a worker thread."""

    def __init__(self, budget_bytes: int) -> None:
        self.stats = CacheStats()
        self._entries: ByteLRU[Cached] = ByteLRU(budget_bytes)
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    async def get(self, ref: RawImageRef, compute: Callable[[], Cached]) -> Cached:
        """Features of ``ref``: cached, awaited from an in-flight computation, or computed now."""
        key = (ref.sha256, ref.fingerprint)
        cached = self._entries.get(key)
        if cached is not None:
            self.stats.hits += 1
            return self._checked(ref, cached)
        if key in self._inflight:
            self.stats.hits += 1
            return self._checked(ref, await asyncio.shield(self._inflight[key]))
        self.stats.misses += 1
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            features = await asyncio.to_thread(compute)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it; nothing is cached
            raise
        finally:
            self._inflight.pop(key, None)
        self.stats.processed += 1
        future.set_result(features)
        self._entries.put(key, features)
        self.stats.evictions = self._entries.evictions
        return features

    @staticmethod
    def _checked(ref: RawImageRef, features: Cached) -> Cached:
        if tuple(features.grid_thw) != tuple(ref.grid_thw):
            raise ContractMismatchError(f"inference server: image {ref.describe()}: ref grid_thw {ref.grid_thw} does "
                                        f"not match the stored image's grid {features.grid_thw}")
        return features
