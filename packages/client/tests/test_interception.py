"""Interception errors: OpenAI-shaped 400s for bad requests, 503 when inference is down."""

import asyncio

import httpx
import pytest

from mmref.client.interception import create_interception_app
from mmref.client.train_client import TrainClient
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer


def post(app, body, content=None):
    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://i") as c:
            if content is not None:
                return await c.post("/v1/chat/completions", content=content)
            return await c.post("/sessions/s1/v1/chat/completions", json=body)
    return asyncio.run(call())


@pytest.fixture
def app(tmp_path):
    renderer = create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=layout_spec("qwen2-vl"))
    dead = TrainClient("http://127.0.0.1:9", max_retries=1, backoff_s=0.001)  # port 9: nothing listens
    return create_interception_app(renderer, dead, ImageStore(tmp_path))


@pytest.mark.parametrize("body,needle", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///x.png"}}]}]},
     "never fetched"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "message 0 is invalid"),
])
def test_bad_requests_are_openai_shaped_400s(app, body, needle):
    response = post(app, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_non_json_body_is_a_400(app):
    assert post(app, None, content=b"{nope").status_code == 400


def test_unreachable_inference_server_is_a_503(app):
    response = post(app, {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503 and "unavailable" in response.json()["error"]["message"]


def _upstream(status: int, body: dict) -> httpx.MockTransport:
    """A stand-in inference server: ``/v1/models`` and a fixed answer to every generate call."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})
        return httpx.Response(status, json=body)
    return httpx.MockTransport(handle)


def _app(tmp_path, status, body, **kwargs):
    renderer = create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=layout_spec("qwen2-vl"))
    client = TrainClient("http://inference", transport=_upstream(status, body), max_retries=0)
    return create_interception_app(renderer, client, ImageStore(tmp_path / "store"), **kwargs), renderer


def test_failing_inference_server_is_a_502_not_a_400(tmp_path):
    app, _ = _app(tmp_path, 500, {"error": {"message": "engine exploded"}})
    response = post(app, {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502 and "engine exploded" in response.json()["error"]["message"]


def test_an_upstream_refusal_is_a_400_naming_it(tmp_path):
    app, _ = _app(tmp_path, 400, {"error": {"message": "prompt too long"}})
    response = post(app, {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and "prompt too long" in response.json()["error"]["message"]


def test_traces_are_kept_per_session_served_and_written_to_the_trace_dir(tmp_path):
    from mmref.client.trace import Trace

    tokenizer = qwen2_tokenizer()
    answer = tokenizer.encode("blue") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ok = {"choices": [{"token_ids": answer, "logprobs": [-0.5] * len(answer), "finish_reason": "stop"}],
          "weight_version": 7}
    app, renderer = _app(tmp_path, 200, ok, trace_dir=tmp_path / "traces")
    turn1 = [{"role": "user", "content": "colour?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "blue"}, {"role": "user", "content": "again?"}]

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://i") as c:
            for body in ({"messages": turn1}, {"messages": turn2}):
                assert (await c.post("/sessions/a/v1/chat/completions", json=body)).status_code == 200
            assert (await c.post("/v1/chat/completions", json={"messages": turn1},
                                 headers={"Authorization": "Bearer b"})).status_code == 200
            return [await c.get(f"/sessions/{s}/trace") for s in ("a", "b", "nobody")]
    a, b, missing = asyncio.run(calls())
    assert [len(Trace.model_validate(r.json()).nodes) for r in (a, b)] == [2, 1]  # sessions never mix
    assert missing.status_code == 404 and "no session 'nobody'" in missing.json()["error"]["message"]
    written = Trace.from_json((tmp_path / "traces" / "a.json").read_text())
    assert written == Trace.model_validate(a.json())
    assert written.nodes[1].prompt_ids[: len(written.nodes[0].prompt_ids)] == written.nodes[0].prompt_ids  # bridged
    assert all(n.weight_version == 7 for n in written.nodes)
