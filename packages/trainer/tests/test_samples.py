"""Training samples: validation on build, derived token types, GRPO advantages."""

from dataclasses import dataclass

import pytest

from mmref.client.trace import TraceSegment
from mmref.renderers import ImageStore
from mmref.renderers.errors import SlotError
from mmref.trainer.errors import SampleError
from hypothesis import given
from hypothesis import strategies as st

from mmref.trainer.samples import TrainingSample, group_advantages, group_turn_advantages
from trainer_cases import PAD, make_sample


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path)


def rebuild(sample, **changes):
    fields = dict(family=sample.family, token_ids=sample.token_ids, loss_mask=sample.loss_mask,
                  advantages=sample.advantages, inference_logprobs=sample.inference_logprobs,
                  images=sample.images, image_pad_id=sample.image_pad_id)
    return TrainingSample(**(fields | changes))


def test_mm_token_type_ids_mark_exactly_the_slots(store):
    sample = make_sample(store, "qwen2-vl", 3, [(0, (64, 48)), (1, (40, 40))], 2)
    types = sample.mm_token_type_ids
    assert [i for i, t in enumerate(types) if t] == [i for s in sample.images for i in range(s.offset, s.end)]


def test_slots_must_lie_on_pad_tokens(store):
    sample = make_sample(store, "qwen2-vl", 3, [(0, (64, 48))], 2)
    shifted = [sample.images[0].shifted(1)]
    with pytest.raises(SlotError, match="training sample: image slot 0 .* not image pads"):
        rebuild(sample, images=shifted)


def test_every_pad_needs_a_slot_and_slots_stay_in_range(store):
    sample = make_sample(store, "qwen2-vl", 3, [(0, (64, 48))], 2)
    with pytest.raises(SlotError, match="lie outside every image slot"):
        rebuild(sample, images=[])
    with pytest.raises(SlotError, match="runs past"):
        rebuild(sample, token_ids=sample.token_ids[:6], loss_mask=sample.loss_mask[:6],
                advantages=sample.advantages[:6], inference_logprobs=sample.inference_logprobs[:6])


def test_overlapping_or_unsorted_slots_are_rejected(store):
    sample = make_sample(store, "qwen2-vl", 3, [(0, (64, 48)), (1, (64, 48))], 2)
    with pytest.raises(SlotError, match="must be sorted and disjoint"):
        rebuild(sample, images=list(reversed(sample.images)))


def test_lengths_must_agree(store):
    sample = make_sample(store, "qwen2-vl", 3, [], 2)
    with pytest.raises(SampleError, match="loss_mask has 4 entries for 5 tokens"):
        rebuild(sample, loss_mask=[False] * 4)


def test_from_segment_uses_sampled_mask_for_loss_advantage_and_logprobs(store):
    base = make_sample(store, "qwen2-vl", 3, [(0, (64, 48))], 4)

    @dataclass(frozen=True)
    class Segment:
        family: str
        token_ids: list
        sampled_mask: list
        logprobs: list
        images: list
        weight_version: int = 3
        temperature: float = 0.7

    n = len(base)
    segment = Segment("qwen2-vl", base.token_ids, [i >= n - 2 for i in range(n)], [-0.5] * n, base.images)
    sample = TrainingSample.from_segment(segment, advantage=1.5, image_pad_id=PAD)
    assert sample.loss_mask == segment.sampled_mask and sample.weight_version == 3 and sample.temperature == 0.7
    assert sample.advantages[-2:] == [1.5, 1.5] and set(sample.advantages[:-2]) == {0.0}
    assert sample.inference_logprobs[-1] == -0.5 and sample.inference_logprobs[0] == 0.0


def test_group_advantages_are_normalized_and_zero_for_flat_groups():
    advantages = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert advantages == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert group_advantages([0.5] * 8) == [0.0] * 8
    assert group_advantages([]) == []


@given(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=4), min_size=2, max_size=8))
def test_turn_advantages_normalize_each_turn_among_the_members_that_reached_it(returns):
    advantages = group_turn_advantages(returns)
    assert [len(a) for a in advantages] == [len(r) for r in returns]
    for t in range(max(len(r) for r in returns)):
        reached = [i for i, r in enumerate(returns) if len(r) > t]
        assert [advantages[i][t] for i in reached] == group_advantages([returns[i][t] for i in reached])


def test_per_turn_advantages_land_on_their_turns_tokens():
    segment = TraceSegment("qwen2-vl", [1, 7, 8, 2, 9], [False, True, True, False, True],
                           [0.0, -0.1, -0.2, 0.0, -0.3], [], 0, 1.0, turns=[-1, 0, 0, -1, 1])
    sample = TrainingSample.from_segment(segment, advantage=[2.0, -1.0], image_pad_id=PAD)
    assert sample.advantages == [0.0, 2.0, 2.0, 0.0, -1.0]
