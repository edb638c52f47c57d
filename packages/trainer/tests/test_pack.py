"""Packing: first-fit-decreasing rows, rebased slots, image-boundary truncation, wire format."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmref.renderers import ImageStore
from mmref.trainer.errors import PackingError
from mmref.trainer.pack import MicroBatch, PackedRow, occupancy, pack, row_position_ids, split_by_tokens, truncate
from mmref.trainer.transport import decode_payload, encode_payload
from trainer_cases import PAD, make_sample, tiny


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path)


def test_rows_respect_max_len_and_keep_every_token(store):
    samples = [make_sample(store, "qwen2-vl", n, [(n, (64, 48))] if n % 2 else [], 3) for n in range(1, 12)]
    rows = pack(samples, 64)
    assert all(len(r) <= 64 for r in rows)
    assert sum(len(r) for r in rows) == sum(len(s) for s in samples)
    assert sorted(l for r in rows for l in r.sample_lengths) == sorted(len(s) for s in samples)


def test_slots_are_rebased_onto_pad_tokens(store):
    samples = [make_sample(store, "qwen2-vl", 2 + i, [(i, (64, 48))], 1) for i in range(4)]
    for row in pack(samples, 4096):
        for slot in row.images:
            assert row.token_ids[slot.offset:slot.end] == [PAD] * slot.length
        assert sum(row.mm_token_type_ids) == sum(s.length for s in row.images)


def test_families_never_share_a_row(store):
    rows = pack([make_sample(store, "qwen2-vl", 3, [], 2), make_sample(store, "qwen3-vl", 3, [], 2)], 4096)
    assert sorted(r.family for r in rows) == ["qwen2-vl", "qwen3-vl"]


def test_truncation_cuts_before_an_image_never_inside(store):
    sample = make_sample(store, "qwen2-vl", 4, [(0, (64, 48)), (1, (64, 48))], 3)
    second = sample.images[1]
    cut = truncate(sample, second.offset + 2)
    assert len(cut) == second.offset - 1 and len(cut.images) == 1


def test_sample_whose_first_image_does_not_fit_raises(store):
    sample = make_sample(store, "qwen2-vl", 4, [(0, (64, 48))], 3)
    with pytest.raises(PackingError, match="first image .* max_seq_len 8"):
        pack([sample], 8)


def test_occupancy_and_wire_round_trip(store):
    samples = [make_sample(store, "qwen2-vl", 3, [(0, (64, 48))], 5)] * 3
    rows = pack(samples, 100)
    assert occupancy(rows, 100) == pytest.approx(sum(len(s) for s in samples) / (100 * len(rows)))
    batch = MicroBatch(step=7, rows=rows)
    assert MicroBatch.from_wire(batch.to_wire()) == batch
    assert "pixel_values" not in str(batch.to_wire())


def test_text_position_row_restarts_per_sample(store):
    row = pack([make_sample(store, "qwen2-vl", 3, [(0, (64, 48))], 2), make_sample(store, "qwen2-vl", 4, [], 1)],
               4096)[0]
    positions = row_position_ids(tiny("qwen2-vl").model.get_rope_index, row)
    assert positions.shape == (4, 1, len(row))
    first = row.sample_lengths[0]
    assert positions[0, 0, first].item() == 0 and positions[0, 0, first - 1].item() == first - 1
    assert torch.equal(positions[0, 0, :first], torch.arange(first))


def _row(length: int) -> PackedRow:
    return PackedRow("qwen2-vl", [1] * length, [True] * length, [0.0] * length, [0.0] * length, [], [length], PAD, [1.0])


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 2048), max_size=40), parts=st.integers(1, 8))
def test_split_by_tokens_deals_every_row_once_with_loads_within_one_row(lengths, parts):
    rows = [_row(n) for n in lengths]
    groups = split_by_tokens(rows, parts)
    assert len(groups) == parts
    assert sorted(id(r) for g in groups for r in g) == sorted(id(r) for r in rows)
    loads = [sum(len(r) for r in g) for g in groups]
    if rows:  # greedy to the lightest group: no group exceeds another by more than the longest row
        assert max(loads) - min(loads) <= max(lengths)


def test_a_row_with_branches_survives_the_compact_wire_and_counts_them_as_loss_tokens():
    row = PackedRow("qwen2-vl", [1, 2, 3], [False, True, True], [0.0, 1.0, 1.0], [0.0, -1.0, -1.5], [], [3], PAD,
                    [0.7], branch_positions=[2, 2], branch_token_ids=[5, 6], branch_advantages=[0.5, -0.25],
                    branch_logprobs=[-1.0, -2.0])
    micro_batch = MicroBatch(3, [row, PackedRow("qwen2-vl", [1], [False], [0.0], [0.0], [], [1], PAD, [1.0])])
    (back,) = [MicroBatch.from_wire(d) for d in decode_payload(encode_payload([micro_batch.to_wire()]))]
    assert back == micro_batch and back.num_loss_tokens == 4
