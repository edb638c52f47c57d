"""The slot invariant has one home (``mmref.renderers.refs.check_slots``) and every stage agrees.

Over generated token sequences and slot layouts (valid ones, and ones with a stray pad, a
missing pad, a shifted, dropped, duplicated or reordered slot, or a pad in the completion),
the client's trace, the trainer's sample, the inference server's request validation and a
trainer rank's check of what it receives all accept, or all refuse.
"""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmref.client.errors import TraceError
from mmref.client.trace import Trace, TraceNode
from mmref.renderers import ImageStore, make_ref
from mmref.renderers.errors import MMRefError
from mmref.renderers.refs import ImageSlot
from mmref.trainer.inference.api import GenerateRequest
from mmref.trainer.inference.validate import RequestError, validate_request
from mmref.trainer.pack import MicroBatch, PackedRow
from mmref.trainer.samples import TrainingSample
from mmref.trainer.step import PolicyTrainer
from mmref.trainer.run_config import TrainConfig
from trainer_cases import END, IMAGE_TOKENS, PAD, START, color_image, processor, small_spec, tiny

FAMILY = "qwen2-vl"
STOP = 151645
COMPLETION = [11, 12, STOP]


@functools.cache
def refs():
    store = ImageStore("memory://slot-invariant")
    made = [make_ref(small_spec(FAMILY), store.put_image(color_image(i, (28 + 14 * i, 28)))) for i in range(3)]
    return store, made


@functools.cache
def rank_trainer() -> PolicyTrainer:
    store, _ = refs()
    return PolicyTrainer(tiny(FAMILY), store=store, spec=small_spec(FAMILY), processor=processor(FAMILY),
                         config=TrainConfig(), image_token_ids=IMAGE_TOKENS)


@st.composite
def layouts(draw):
    """(prompt ids, slots): a valid prompt of 0-3 images, then at most one fault."""
    _, made = refs()
    chosen = draw(st.lists(st.sampled_from(made), max_size=3))
    ids, slots = [1, 2], []
    for ref in chosen:
        ids.append(START)
        slots.append(ImageSlot(ref=ref, offset=len(ids), length=ref.num_tokens))
        ids += [PAD] * ref.num_tokens + [END, 5]
    ids += [6, 7]
    completion = list(COMPLETION)
    fault = draw(st.sampled_from(["none", "stray pad", "missing pad", "shift", "drop", "duplicate", "reorder",
                                  "pad in completion"]))
    if fault == "stray pad":
        ids[draw(st.sampled_from([i for i, t in enumerate(ids) if t != PAD]))] = PAD
    elif fault == "pad in completion":
        completion[0] = PAD
    elif slots:
        k = draw(st.integers(0, len(slots) - 1))
        if fault == "missing pad":
            ids[slots[k].offset + draw(st.integers(0, slots[k].length - 1))] = 9
        elif fault == "shift":
            slots[k] = slots[k].shifted(draw(st.sampled_from([-1, 1])))
        elif fault == "drop":
            del slots[k]
        elif fault == "duplicate":
            slots.insert(k, slots[k])
        elif fault == "reorder":
            slots.reverse()
    return ids, completion, slots


def accepts_trace(ids, completion, slots) -> bool:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": s.ref.encode()}} for s in slots]}]
    node = TraceNode(prompt_ids=ids, completion_ids=completion, completion_logprobs=[-1.0] * len(completion),
                     images=slots, num_messages=1, temperature=1.0)
    try:
        Trace.build(rollout_id="r", family=FAMILY, image_pad_id=PAD, stop_token_ids=[STOP], messages=messages,
                    nodes=[node])
    except TraceError:
        return False
    return True


def sample_of(ids, completion, slots) -> TrainingSample:
    tokens = ids + completion
    mask = [i >= len(ids) for i in range(len(tokens))]
    return TrainingSample(FAMILY, tokens, mask, [1.0 * m for m in mask], [-1.0 * m for m in mask], slots, PAD)


def accepts_sample(ids, completion, slots) -> bool:
    try:
        sample_of(ids, completion, slots)
    except MMRefError:
        return False
    return True


def accepts_request(ids, completion, slots) -> bool:
    wire = [{"ref": s.ref.encode(), "offset": s.offset, "length": s.length} for s in slots]
    # The server sees a prompt; a completion's tokens reach it as the prompt of the next turn.
    request = GenerateRequest(token_ids=ids + completion, images=wire)
    try:
        validate_request(request, small_spec(FAMILY), PAD, max_model_len=10**6, vocab_size=152_064)
    except RequestError:
        return False
    return True


def accepts_rank(ids, completion, slots) -> bool:
    tokens = ids + completion
    n = len(tokens)
    row = PackedRow(FAMILY, tokens, [i >= len(ids) for i in range(n)], [0.0] * n, [0.0] * n, slots, [n], PAD, [1.0])
    try:
        rank_trainer().prepare([MicroBatch.from_wire(MicroBatch(0, [row]).to_wire())])
    except MMRefError:
        return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_every_stage_accepts_and_refuses_the_same_slot_layouts(layout):
    ids, completion, slots = layout
    verdicts = {"trace": accepts_trace(*layout), "sample": accepts_sample(*layout),
                "inference server": accepts_request(*layout), "trainer rank": accepts_rank(*layout)}
    event(f"accepted={verdicts['trace']}")
    assert len(set(verdicts.values())) == 1, verdicts
