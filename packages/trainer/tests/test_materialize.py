"""Materializer: one decode per unique image, exact pixels, missing-image policies, checks."""

import dataclasses
import os

import pytest
import torch

import mmref.trainer.pixels as pixels
from mmref.renderers import ImageStore
from mmref.renderers.errors import ContractMismatchError, IntegrityError
from mmref.trainer.errors import MissingImageError
from mmref.trainer.materialize import Materializer
from mmref.trainer.pack import pack
from trainer_cases import color_image, make_sample, processor, small_spec


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path)


def materializer(store, **kwargs):
    return Materializer(store, small_spec("qwen2-vl"), processor("qwen2-vl"), **kwargs)


def group(store, n=8):
    """A GRPO-like group: n samples that all show images 0 and 1."""
    return [make_sample(store, "qwen2-vl", 2 + i, [(0, (64, 48)), (1, (40, 40))], 3, sampled=2) for i in range(n)]


def test_each_unique_image_decoded_once_across_all_rows(store, monkeypatch):
    calls = []
    real = pixels.decode_rgb
    monkeypatch.setattr(pixels, "decode_rgb", lambda data, ref, *a: calls.append(ref.sha256) or real(data, ref, *a))
    rows = pack(group(store), 120)
    assert len(rows) > 1
    out = materializer(store).materialize(rows)
    assert sorted(calls) == sorted({s.ref.sha256 for r in rows for s in r.images})
    assert sum(o.image_grid_thw.shape[0] for o in out) == 16


def test_pixels_equal_the_processor_on_each_slot_and_are_held_once_per_row(store):
    (row,) = pack(group(store, 2), 4096)
    (out,) = materializer(store).materialize([row])
    images = [color_image(0, (64, 48)), color_image(1, (40, 40))]
    expected = processor("qwen2-vl")(images=images * 2, return_tensors="pt")
    assert torch.equal(out.slot_pixel_values(), expected["pixel_values"])
    assert torch.equal(out.image_grid_thw, expected["image_grid_thw"])
    unique = processor("qwen2-vl")(images=images, return_tensors="pt")
    assert torch.equal(out.pixel_values(), unique["pixel_values"])  # 4 slots, 2 images held
    assert out.image_index.tolist() == [0, 1, 0, 1]
    assert torch.equal(out.unique_grid_thw, unique["image_grid_thw"])


def test_missing_image_under_error_policy_names_assets(store):
    samples = group(store, 2)
    asset = samples[0].images[1].ref.asset
    os.remove(os.path.join(store.root, asset))
    with pytest.raises(MissingImageError, match=asset):
        materializer(store).materialize(pack(samples, 4096))


def test_missing_image_placeholder_masks_only_affected_samples(store):
    hit = make_sample(store, "qwen2-vl", 3, [(5, (64, 48))], 3, sampled=2)
    clean = make_sample(store, "qwen2-vl", 4, [(6, (40, 40))], 3, sampled=2)
    os.remove(os.path.join(store.root, hit.images[0].ref.asset))
    m = materializer(store, missing_image_policy="placeholder_zero_loss")
    (out,) = m.materialize(pack([hit, clean], 4096))
    start = 0
    for length in out.row.sample_lengths:
        span = out.loss_mask[start:start + length]
        is_hit = out.row.token_ids[start:start + length] == hit.token_ids
        assert (span.sum().item() == 0) == is_hit and (is_hit or span.sum().item() == 2)
        start += length
    assert out.missing_assets == [hit.images[0].ref.asset] and m.stats.missing_images == 1
    assert out.slot_pixel_values().shape[0] == sum(torch.tensor(s.ref.grid_thw).prod().item() for s in out.row.images)


def test_tampered_image_is_an_integrity_error(store):
    sample = make_sample(store, "qwen2-vl", 3, [(9, (64, 48))], 2)
    path = os.path.join(store.root, sample.images[0].ref.asset)
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(IntegrityError, match=sample.images[0].ref.asset):
        materializer(store).materialize(pack([sample], 4096))


def test_trainer_with_other_resize_parameters_refuses_refs(store):
    sample = make_sample(store, "qwen2-vl", 3, [(2, (64, 48))], 2)
    drifted = Materializer(store, small_spec("qwen2-vl").replace(max_pixels=64 * 64), processor("qwen2-vl"))
    with pytest.raises(ContractMismatchError, match="fingerprint"):
        drifted.materialize(pack([sample], 4096))


def test_cross_step_cache_respects_its_byte_budget(store, monkeypatch):
    rows = pack(group(store, 2), 4096)
    m = materializer(store, cache_bytes=10**8)
    m.materialize(rows)
    m.materialize(rows)
    assert m.stats.images_processed == 2 and m.stats.cache_hits == 2
    tiny_cache = materializer(store, cache_bytes=1)
    tiny_cache.materialize(rows)
    tiny_cache.materialize(rows)
    assert tiny_cache.stats.images_processed == 4 and tiny_cache._cache.bytes <= 1


@pytest.mark.parametrize("field, delta", [("width", 1), ("height", -1)])
def test_a_cached_image_refuses_an_edited_ref_exactly_as_a_cold_one(store, field, delta):
    """Same request, same answer: a hit runs the check a miss runs (the edit keeps the grid)."""
    sample = make_sample(store, "qwen2-vl", 3, [(5, (64, 48))], 2)
    slot = sample.images[0]
    edited = slot.ref.model_copy(update={field: getattr(slot.ref, field) + delta})
    assert edited.grid_thw == slot.ref.grid_thw
    bad_rows = pack([dataclasses.replace(sample, images=[slot.model_copy(update={"ref": edited})])], 4096)
    answers = []
    for warm in (False, True):
        m = materializer(store, cache_bytes=10**8)
        if warm:
            m.materialize(pack([sample], 4096))
        with pytest.raises(ContractMismatchError) as caught:
            m.materialize(bad_rows)
        answers.append(str(caught.value))
    assert answers[0] == answers[1] and f"{field} " in answers[0]
