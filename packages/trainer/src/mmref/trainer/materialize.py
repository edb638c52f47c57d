"""The only trainer stage that turns refs into pixels, right before the forward pass.

For a packed row: every unique sha256 is read, hash-verified, decoded and processed
once (thread pool) and moved to the device once per micro-batch. A row holds its unique
images (shared tensors, no copy) and ``image_index`` maps each slot to one of them; the
forward concatenates them on the device and runs the vision tower once per unique image
(``mmref.trainer.vision_once``). Each image is processed from what its stored bytes say
(``pixels.stored_image_ref``) and every ref is held to that, grid and token count included
(``verify_ref_against_image``), on every lookup of the optional cross-step cache (LRU under
a byte budget), hit or miss alike. When an image cannot be read:

| missing_image_policy    | what happens                                                        |
|-------------------------|---------------------------------------------------------------------|
| error (default)         | ``MissingImageError`` naming every missing asset                    |
| placeholder_zero_loss   | zeros shaped from the ref's grid; loss masked off for the affected  |
|                         | samples only; a warning naming the assets; ``missing_images`` count |
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mmref.renderers.contract import verify_ref_against_image
from mmref.renderers.errors import AssetNotFoundError
from mmref.renderers.layout import LayoutSpec
from mmref.renderers.refs import RawImageRef
from mmref.renderers.store import ImageStore
from mmref.trainer.byte_lru import ByteLRU
from mmref.trainer.errors import MissingImageError
from mmref.trainer.pack import PackedRow
from mmref.trainer.pixels import ImageFeatures, StoredEntry, process_pixels, stored_image_ref

log = logging.getLogger(__name__)
MissingPolicy = Literal["error", "placeholder_zero_loss"]


@dataclass(frozen=True)
class MaterializedRow:
    """A packed row with its pixels.

    input_ids:        (1, L) int64
    mm_token_type_ids:(1, L) int32
    unique_pixels:    one (t*h*w, C*tp*p*p) tensor per unique image of the row, on the device
                      (Kimi: (t*h*w, C, p, p); ``LayoutSpec.pixel_values_shape``)
    unique_grid_thw:  (num_unique, 3) int64 or None, their grids
    image_index:      (num_slots,) int64 or None, slot -> unique image
    image_grid_thw:   (num_slots, 3) int64 or None, per slot (what the pad tokens need)
    loss_mask:        (L,) bool, with samples of missing images masked off
    branch_mask:      (B,) bool over ``row.branch_*``, likewise
    """

    row: PackedRow
    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    unique_pixels: tuple[torch.Tensor, ...]
    unique_grid_thw: torch.Tensor | None
    image_index: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    loss_mask: torch.Tensor
    branch_mask: torch.Tensor
    missing_assets: list[str] = field(default_factory=list)

    def pixel_values(self) -> torch.Tensor | None:
        """The unique images' pixels in one tensor (what the vision tower runs on); a copy."""
        return torch.cat(self.unique_pixels) if self.unique_pixels else None

    def slot_pixel_values(self) -> torch.Tensor | None:
        """Pixels laid out per slot (each unique image repeated where it is used), as a processor makes them."""
        if not self.unique_pixels:
            return None
        return torch.cat([self.unique_pixels[i] for i in self.image_index.tolist()])


@dataclass
class MaterializeStats:
    """Counters since construction (the metrics of this stage)."""

    images_processed: int = 0
    slots_filled: int = 0
    cache_hits: int = 0
    missing_images: int = 0
    bytes_read: int = 0


class Materializer:
    """Refs to pixel tensors, with dedupe, a thread pool, a byte-budget cache and checks."""

    def __init__(self, store: ImageStore, spec: LayoutSpec, processor: Any, *, threads: int = 4,
                 cache_bytes: int = 0, missing_image_policy: MissingPolicy = "error",
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        self.store, self.spec, self.processor = store, spec, processor
        self.policy, self.device, self.dtype = missing_image_policy, torch.device(device), dtype
        self.stats = MaterializeStats()
        self._cache: ByteLRU[StoredEntry] = ByteLRU(cache_bytes)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mmref-materialize")

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def materialize(self, rows: Sequence[PackedRow]) -> list[MaterializedRow]:
        """Pixels for every slot of ``rows``; each unique image is processed at most once."""
        unique: dict[str, RawImageRef] = {}
        for row in rows:
            for slot in row.images:
                unique.setdefault(slot.ref.sha256, slot.ref)
        features = dict(zip(unique, self._pool.map(self._features, unique.values())))
        missing = sorted({ref.asset for sha, ref in unique.items() if features[sha] is None})
        if missing and self.policy == "error":
            raise MissingImageError(f"trainer: {len(missing)} image(s) missing from store {self.store.url}: "
                                    f"{', '.join(missing)} (missing_image_policy='error')")
        if missing:
            self.stats.missing_images += len(missing)
            log.warning("trainer: images missing, zero-loss placeholders used for their samples: %s", ", ".join(missing))
        pixels = {sha: self._to_device(found.pixel_values if (found := features[sha]) is not None
                                       else self._placeholder(ref)) for sha, ref in unique.items()}
        return [self._place(row, pixels, set(missing)) for row in rows]

    def _place(self, row: PackedRow, pixels: dict[str, torch.Tensor], missing: set[str]) -> MaterializedRow:
        first: dict[str, RawImageRef] = {}
        for slot in row.images:
            first.setdefault(slot.ref.sha256, slot.ref)
        position = {sha: i for i, sha in enumerate(first)}
        self.stats.slots_filled += len(row.images)
        loss_mask = torch.tensor(row.loss_mask, dtype=torch.bool)
        branch_mask = torch.ones(len(row.branch_positions), dtype=torch.bool)
        row_missing = sorted({s.ref.asset for s in row.images if s.ref.asset in missing})
        if row_missing:
            _mask_samples_with(loss_mask, branch_mask, row, {s.ref.sha256 for s in row.images if s.ref.asset in missing})
        return MaterializedRow(
            row=row, input_ids=torch.tensor([row.token_ids]),
            mm_token_type_ids=torch.tensor([row.mm_token_type_ids], dtype=torch.int32),
            unique_pixels=tuple(pixels[sha] for sha in first),
            unique_grid_thw=torch.tensor([ref.grid_thw for ref in first.values()]) if first else None,
            image_index=torch.tensor([position[s.ref.sha256] for s in row.images]) if first else None,
            image_grid_thw=torch.tensor([s.ref.grid_thw for s in row.images]) if first else None,
            loss_mask=loss_mask, branch_mask=branch_mask, missing_assets=row_missing,
        )

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned host memory makes the copy asynchronous
            pixels = pixels.pin_memory()
        return pixels.to(self.device, self.dtype or pixels.dtype, non_blocking=True)

    def _features(self, ref: RawImageRef) -> ImageFeatures | None:
        """The image's features, once ``ref`` passes the same check whether the cache held them or not."""
        key = (ref.asset, ref.sha256)
        with self._lock:
            entry = self._cache.get(key)
            self.stats.cache_hits += entry is not None
        if entry is None:
            try:
                actual, data = stored_image_ref(self.store, self.spec, ref.asset, ref.sha256)
            except AssetNotFoundError:
                return None
        verify_ref_against_image(ref, entry.actual if entry else actual, self.spec, "trainer")
        if entry is None:
            entry = StoredEntry(actual, process_pixels(data, actual, self.processor, "trainer"))
            with self._lock:
                self.stats.images_processed += 1
                self._cache.put(key, entry)
        return entry.value

    def _placeholder(self, ref: RawImageRef) -> torch.Tensor:
        return torch.zeros(self.spec.pixel_values_shape(ref.grid_thw))


def _mask_samples_with(loss_mask: torch.Tensor, branch_mask: torch.Tensor, row: PackedRow, shas: set[str]) -> None:
    """Mask off the loss (own tokens and branches) of every sample in ``row`` that holds one of ``shas``."""
    start = 0
    positions = torch.tensor(row.branch_positions, dtype=torch.long)
    for length in row.sample_lengths:
        end = start + length
        if any(start <= s.offset < end and s.ref.sha256 in shas for s in row.images):
            loss_mask[start:end] = False
            branch_mask &= ~((positions >= start) & (positions < end))
        start = end
