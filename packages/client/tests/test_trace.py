"""Traces: invariants on build and load, segments across bridged and re-rendered turns."""

import json

import pytest
from pydantic import ValidationError

from mmref.client.errors import TraceError
from mmref.client.trace import Trace, TraceNode
from mmref.renderers import ImageStore, layout_spec, make_ref
from mmref.renderers.refs import ImageSlot
from PIL import Image

PAD, STOP = 151655, 151645


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    store = ImageStore(tmp_path_factory.mktemp("s"))
    return make_ref(layout_spec("qwen2-vl"), store.put_image(Image.new("RGB", (56, 56))))


def user(ref):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref.encode()}}]}


def node(prompt, completion, images, num_messages, logprob=-0.5, temperature=1.0):
    return TraceNode(prompt_ids=prompt, completion_ids=completion, completion_logprobs=[logprob] * len(completion),
                     images=images, num_messages=num_messages, temperature=temperature)


def two_turns(ref, second_prompt_prefix=None):
    n = ref.num_tokens
    p1 = [1, 151652] + [PAD] * n + [151653, 2]
    c1 = [7, STOP, 99]  # junk after the stop is dropped by the bridge
    slot1 = ImageSlot(ref=ref, offset=2, length=n)
    prefix = second_prompt_prefix if second_prompt_prefix is not None else p1 + c1[:2]
    p2 = prefix + [198, 1, 151652] + [PAD] * n + [151653, 2]
    slot2 = ImageSlot(ref=ref, offset=len(prefix) + 3, length=n)
    messages = [user(ref), {"role": "assistant", "content": "x"}, user(ref), {"role": "assistant", "content": "y"}]
    nodes = [node(p1, c1, [slot1], 1, -0.1), node(p2, [8, STOP], [slot1, slot2], 3)]
    return dict(rollout_id="r", family="qwen2-vl", image_pad_id=PAD, stop_token_ids=[STOP], messages=messages,
                nodes=nodes, reward=1.0)


def test_bridged_turns_form_one_segment_with_sampled_tokens_and_logprobs(ref):
    trace = Trace.build(**two_turns(ref))
    (segment,) = trace.segments()
    n1 = len(trace.nodes[0].prompt_ids)
    assert segment.token_ids == trace.nodes[1].prompt_ids + [8, STOP]
    assert [i for i, m in enumerate(segment.sampled_mask) if m] == [n1, n1 + 1, len(segment.token_ids) - 2,
                                                                   len(segment.token_ids) - 1]
    assert segment.logprobs[n1] == -0.1 and segment.logprobs[-1] == -0.5 and len(segment.images) == 2


def test_a_re_rendered_turn_starts_a_new_segment(ref):
    fields = two_turns(ref, second_prompt_prefix=[1, 151652] + [PAD] * ref.num_tokens + [151653, 2, 5, STOP])
    segments = Trace.build(**fields).segments()
    assert len(segments) == 2 and sum(segments[0].sampled_mask) == 3 and sum(segments[1].sampled_mask) == 2


def test_slot_off_pad_tokens_is_a_trace_error(ref):
    fields = two_turns(ref)
    bad = fields["nodes"][0].model_copy(update={"images": [ImageSlot(ref=ref, offset=1, length=ref.num_tokens)]})
    with pytest.raises(TraceError, match="node 0 .*: image slot 0 .* not image pads"):
        Trace.build(**{**fields, "nodes": [bad, fields["nodes"][1]]})


def test_slots_must_match_image_parts_in_message_order(ref):
    fields = two_turns(ref)
    with pytest.raises(TraceError, match="do not match the 1 image parts"):
        Trace.build(**{**fields, "messages": fields["messages"][:1] + [{"role": "user", "content": "no image"}] * 3})


def test_pad_in_completion_and_pixel_payloads_are_rejected(ref):
    fields = two_turns(ref)
    sampled_pad = fields["nodes"][0].model_copy(update={"completion_ids": [PAD, STOP, 1]})
    with pytest.raises(TraceError, match="image-pad tokens .* lie outside every image slot, first at position .* \\(a sampled token\\)"):
        Trace.build(**{**fields, "nodes": [sampled_pad, fields["nodes"][1]]})
    with pytest.raises(TraceError, match="pixel_values"):
        Trace.build(**{**fields, "messages": fields["messages"] + [{"role": "user", "pixel_values": [[0.0]]}]})


def test_round_trips_and_load_validation(ref):
    trace = Trace.build(**two_turns(ref))
    assert Trace.from_json(trace.to_json()) == trace and Trace.from_msgpack(trace.to_msgpack()) == trace
    tampered = trace.to_json().replace('"image_pad_id":151655', '"image_pad_id":151656')
    with pytest.raises(TraceError, match="not image pads"):
        Trace.from_json(tampered)


def test_overlapping_or_unsorted_slots_are_trace_errors(ref):
    fields = two_turns(ref)
    second = fields["nodes"][1]
    slot1, slot2 = second.images
    for images in ([slot2, slot1], [slot1, slot1]):
        bad = second.model_copy(update={"images": images})
        with pytest.raises(TraceError, match="must be sorted and disjoint"):
            Trace.build(**{**fields, "nodes": [fields["nodes"][0], bad]})


def test_loading_a_trace_with_a_pixel_payload_is_refused(ref):
    import msgpack

    trace = Trace.build(**two_turns(ref))
    data = trace.model_dump(mode="json")
    data["messages"][0]["content"][0]["image_url"]["image_embeds"] = [[0.5]]
    with pytest.raises(TraceError, match="image_embeds"):
        Trace.from_msgpack(msgpack.packb(data))
    metrics = {**trace.model_dump(mode="json"), "metrics": {"image_embeds": 1.0}}
    with pytest.raises(TraceError, match="image_embeds"):
        Trace.from_json(json.dumps(metrics))


def test_a_turn_sampled_at_another_temperature_starts_a_new_segment_carrying_it(ref):
    fields = two_turns(ref)
    first, second = fields["nodes"]
    segments = Trace.build(**{**fields, "nodes": [first, second.model_copy(update={"temperature": 0.7})]}).segments()
    assert [s.temperature for s in segments] == [1.0, 0.7]
    assert [sum(s.sampled_mask) for s in segments] == [len(first.completion_ids), len(second.completion_ids)]


def test_a_node_must_say_its_sampling_temperature(ref):
    with pytest.raises(ValidationError, match="temperature"):
        TraceNode(prompt_ids=[1], completion_ids=[2], completion_logprobs=[-1.0], images=[], num_messages=1)


def test_segment_turns_name_the_node_of_every_sampled_token(ref):
    bridged = Trace.build(**two_turns(ref)).segments()[0]
    assert [t for t, m in zip(bridged.turns, bridged.sampled_mask) if m] == [0, 0, 1, 1]
    assert {t for t, m in zip(bridged.turns, bridged.sampled_mask) if not m} == {-1}
    fields = two_turns(ref, second_prompt_prefix=[1, 151652] + [PAD] * ref.num_tokens + [151653, 2, 5, STOP])
    first, second = Trace.build(**fields).segments()
    assert set(first.turns) == {-1, 0} and set(second.turns) == {-1, 1}


def test_returns_to_go_are_what_each_turn_and_later_ones_earned(ref):
    trace = Trace.build(**two_turns(ref) | dict(reward=0.5, turn_rewards=[0.5, 0.5]))
    assert trace.returns_to_go() == [0.5, 0.0]  # turn one earned it all, turn two nothing
    assert Trace.build(**two_turns(ref)).returns_to_go() == [1.0, 1.0]  # no turn rewards: the episode's
    with pytest.raises(TraceError, match="1 turn rewards for 2 nodes"):
        Trace.build(**two_turns(ref) | dict(turn_rewards=[1.0]))
