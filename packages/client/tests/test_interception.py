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
