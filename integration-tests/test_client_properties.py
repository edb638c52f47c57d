"""Client invariants over generated inputs.

(a) prepare_images is idempotent and never changes non-image content;
(b) a bridged multi-turn rollout's final prompt equals a full render of its final conversation;
(c) traces round-trip through JSON and msgpack.
"""

import asyncio
import base64
import io
import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmref.client.envs.color_codeword import ColorCodewordConfig, ColorCodewordEnv
from mmref.client.images import prepare_images
from mmref.client.rollout import run_rollout
from mmref.client.trace import Trace
from mmref.client.train_client import Sampling, TrainClient
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer

SPEC = layout_spec("qwen2-vl", max_pixels=128 * 128)


def data_url(seed: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (20 + seed % 40, 30), (seed % 256, 7, 9)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12))
image_parts = st.integers(0, 30).map(lambda s: {"type": "image_url", "image_url": {"url": data_url(s)}})
bodies = st.recursive(scalars | image_parts,
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text("abcxyz", max_size=6),
                                                                                   inner, max_size=4),
                      max_leaves=12)


def strip_images(node):
    if isinstance(node, dict):
        if node.get("type") == "image_url":
            return "<image>"
        return {k: strip_images(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [strip_images(v) for v in node]
    return node


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_prepare_images_is_idempotent_and_leaves_other_content_alone(tmp_path, body):
    store = ImageStore(tmp_path)
    once, stats = prepare_images(body, store, SPEC)
    twice, again = prepare_images(once, store, SPEC)
    assert twice == once and again.written == 0 and again.already_refs == stats.images
    assert strip_images(once) == strip_images(body)
    assert "base64" not in json.dumps(once)


def scripted_server(tokenizer, replies):
    """A stand-in inference server that answers each turn with the next scripted reply."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 32768}]})
        ids = tokenizer.encode(replies.pop(0), add_special_tokens=False) + [151645]
        return httpx.Response(200, json={"choices": [{"token_ids": ids, "logprobs": [-1.0] * len(ids),
                                                      "finish_reason": "stop"}], "weight_version": 0})
    return httpx.MockTransport(handle)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.integers(1, 4), seed=st.integers(0, 1000),
       replies=st.lists(st.text("abcdefghij ,.\n", min_size=1, max_size=12), min_size=4, max_size=4))
def test_bridged_rollout_final_prompt_equals_full_render_and_traces_round_trip(tmp_path, turns, seed, replies):
    tokenizer = qwen2_tokenizer()
    renderer = create_renderer(tokenizer, "qwen2-vl", spec=SPEC)
    store = ImageStore(tmp_path)
    env = ColorCodewordEnv(ColorCodewordConfig(turns=turns), seed=seed)

    async def go():
        async with TrainClient("http://stand-in", transport=scripted_server(tokenizer, list(replies))) as client:
            return await run_rollout(env, renderer, client, store, Sampling(max_tokens=16))
    trace = asyncio.run(go())
    last = trace.nodes[-1]
    full = renderer.render(trace.messages[: last.num_messages])
    assert last.prompt_ids == full.token_ids
    assert [(s.offset, s.ref) for s in last.images] == [(s.offset, s.ref) for s in full.images]
    assert len(trace.segments()) == 1 and trace.metrics["full_renders"] == 1
    assert Trace.from_json(trace.to_json()) == trace and Trace.from_msgpack(trace.to_msgpack()) == trace
