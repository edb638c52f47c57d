"""Interception: OpenAI-shaped errors, sessions of episodes that never break, streamed answers."""

import asyncio
import base64
import io

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mmref.client import sse
from mmref.client.interception import create_interception_app
from mmref.client.trace import Trace
from mmref.client.train_client import TrainClient
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer
from sse_cases import joined, sse_chunks


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


def _answering(renderer, *texts: str, finish: str = "stop") -> httpx.MockTransport:
    """A stand-in inference server that samples ``texts`` in turn (each + the close token when ``finish`` is stop)."""
    queue = list(texts)
    close = [renderer.token_id(renderer.close_token)] if finish == "stop" else []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 8192}]})
        ids = renderer.tokenizer.encode(queue.pop(0), add_special_tokens=False) + close
        return httpx.Response(200, json={"choices": [{"token_ids": ids, "logprobs": [-0.5] * len(ids),
                                                      "finish_reason": finish}], "weight_version": 7})
    return httpx.MockTransport(handle)


def _answering_app(tmp_path, *texts, family="qwen2-vl", **kwargs):
    renderer = create_renderer(qwen2_tokenizer(), family, spec=layout_spec(family))
    client = TrainClient("http://inference", transport=_answering(renderer, *texts), max_retries=0)
    return create_interception_app(renderer, client, ImageStore(tmp_path / "store"), **kwargs), renderer


def _calls(app, *requests):
    """POST each (path, body, headers) in order, then GET every session's trace; the responses."""
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://i") as c:
            posts = [await c.post(path, json=body, headers=headers or {}) for path, body, headers in requests]
            return posts, {s: await c.get(f"/sessions/{s}/trace") for s in app.state.sessions}
    return asyncio.run(run())


def _png(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _user(text, color=None):
    image = [{"type": "image_url", "image_url": {"url": _png(color)}}] if color else []
    return {"role": "user", "content": [{"type": "text", "text": text}, *image]}


def _traces(response) -> list[Trace]:
    assert response.status_code == 200, response.text[:300]
    return [Trace.model_validate(t) for t in response.json()["traces"]]


def test_traces_are_kept_per_session_served_and_written_to_the_trace_dir(tmp_path):
    app, _ = _answering_app(tmp_path, "blue", "blue", "blue", trace_dir=tmp_path / "traces")
    turn1 = [{"role": "user", "content": "colour?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "blue"}, {"role": "user", "content": "again?"}]
    posts, got = _calls(app, ("/sessions/a/v1/chat/completions", {"messages": turn1}, None),
                        ("/sessions/a/v1/chat/completions", {"messages": turn2}, None),
                        ("/v1/chat/completions", {"messages": turn1}, {"Authorization": "Bearer b"}))
    assert [p.status_code for p in posts] == [200, 200, 200]
    assert [[len(t.nodes) for t in _traces(got[s])] for s in ("a", "b")] == [[2], [1]]  # sessions never mix
    written = Trace.from_json((tmp_path / "traces" / "a.0.json").read_text())
    assert written == _traces(got["a"])[0] and written.rollout_id == "a#0"
    assert written.nodes[1].prompt_ids[: len(written.nodes[0].prompt_ids)] == written.nodes[0].prompt_ids  # bridged
    assert all(n.weight_version == 7 for n in written.nodes)
    missing = asyncio.run(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://i")
                          .get("/sessions/nobody/trace"))
    assert missing.status_code == 404 and "no session 'nobody'" in missing.json()["error"]["message"]


def test_a_conversation_that_does_not_extend_the_session_starts_a_new_episode(tmp_path):
    # The regression: a second task in the same session (other images) was a 500 on the call
    # (with a trace dir) and on every later GET of the trace.
    app, renderer = _answering_app(tmp_path, "red", "green", "blue", trace_dir=tmp_path / "traces")
    red, green = [_user("colour?", (200, 0, 0))], [_user("colour?", (0, 200, 0)), _user("sure?", (0, 0, 9))]
    key = {"Authorization": "Bearer k"}
    posts, got = _calls(app, ("/v1/chat/completions", {"messages": red}, key),
                        ("/v1/chat/completions", {"messages": green, "temperature": 0.5}, key),
                        ("/sessions/k/v1/chat/completions", {"messages": red}, None))  # a retry of task 1
    assert [p.status_code for p in posts] == [200, 200, 200]
    traces = _traces(got["k"])
    assert [t.rollout_id for t in traces] == ["k#0", "k#1", "k#2"]
    assert [len(n.images) for t in traces for n in t.nodes] == [1, 2, 1]
    assert [n.temperature for t in traces for n in t.nodes] == [1.0, 0.5, 1.0]  # the trainer scores at it
    assert traces[1].messages[-1] == {"role": "assistant", "content": "green"}
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["k.0.json", "k.1.json", "k.2.json"]


def test_an_edited_reply_continues_the_episode_but_is_rendered_in_full(tmp_path):
    app, _ = _answering_app(tmp_path, "red", "ok", "ok")
    turn1 = [_user("colour?", (200, 0, 0))]
    echoed = turn1 + [{"role": "assistant", "content": "red", "tool_calls": None, "refusal": None}, _user("why?")]
    edited = echoed[:1] + [{"role": "assistant", "content": "crimson"}, _user("why?")]
    posts, got = _calls(app, *[("/sessions/e/v1/chat/completions", {"messages": m}, None)
                               for m in (turn1, echoed, edited)])
    assert [p.status_code for p in posts] == [200, 200, 200]
    # echoed extends turn1 (bridged, one segment); edited does not extend echoed: a new episode
    bridged, rerendered = _traces(got["e"])
    assert [len(bridged.nodes), len(bridged.segments()), len(rerendered.nodes)] == [2, 1, 1]
    app, _ = _answering_app(tmp_path, "red", "ok")
    _, got = _calls(app, *[("/sessions/e/v1/chat/completions", {"messages": m}, None) for m in (turn1, edited)])
    (trace,) = _traces(got["e"])  # edited extends turn1: same episode, but the sampled "red" is not its history
    assert [len(trace.nodes), len(trace.segments())] == [2, 2]


@pytest.mark.parametrize("family,answer", [
    ("qwen2-vl", "The sky is blue.  Twice: blue "),
    ("qwen2.5-vl", 'Looking.\n<tool_call>\n{"name": "zoom", "arguments": {"x": 3, "label": "é"}}\n</tool_call>'),
])
def test_stream_true_sends_chunks_that_join_to_the_non_streamed_answer(tmp_path, family, answer):
    app, _ = _answering_app(tmp_path, answer, answer, family=family)
    body = {"messages": [_user("look", (9, 9, 9))], "max_tokens": 40}
    (plain, streamed), _ = _calls(app, ("/sessions/p/v1/chat/completions", body, None),
                                  ("/sessions/s/v1/chat/completions", {**body, "stream": True,
                                                                       "stream_options": {"include_usage": True}}, None))
    expected, chunks = plain.json(), sse_chunks(streamed)
    message = expected["choices"][0]["message"]
    message_of_chunks = joined(chunks)
    assert {k: message_of_chunks[k] for k in ("role", "content")} == {"role": "assistant", "content": message["content"]}
    assert [(c["type"], c["function"]) for c in message_of_chunks.get("tool_calls", [])] == \
        [(c["type"], c["function"]) for c in message.get("tool_calls", [])]
    assert len(chunks) > 3 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-2]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected["usage"]
    assert all(c["usage"] is None for c in chunks[:-1]) and len({c["id"] for c in chunks}) == 1


def test_stream_errors_are_plain_openai_errors(app):
    response = post(app, {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert response.status_code == 503 and "unavailable" in response.json()["error"]["message"]
    for bad in ({"stream": "yes"}, {"stream": True, "stream_options": {"include_usage": 1}}):
        response = post(app, {"messages": [{"role": "user", "content": "hi"}], **bad})
        assert response.status_code == 400 and "stream" in response.json()["error"]["message"]


@given(st.text(st.sampled_from("ab \n\té")))
def test_content_pieces_join_to_the_content(content):
    pieces = sse.content_pieces(content)
    assert "".join(pieces) == content and all(pieces)


@pytest.mark.parametrize("choice,needle", [
    ({"token_ids": [151655, 151645], "logprobs": [-1.0, -1.0]}, "image-pad"),  # an image pad sampled
    ({"token_ids": [9707, 151645], "logprobs": [-1.0]}, "logprobs"),
    ({"token_ids": [2**40], "logprobs": [-1.0]}, "too large"),
])
def test_an_answer_that_cannot_be_recorded_is_a_502_and_leaves_no_session(tmp_path, choice, needle):
    app, _ = _app(tmp_path, 200, {"choices": [{**choice, "finish_reason": "stop"}], "weight_version": 1})
    response = post(app, {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502 and needle in response.json()["error"]["message"]
    assert app.state.sessions == {}


def test_overlapping_calls_of_one_session_never_mix_conversations(tmp_path):
    renderer = create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=layout_spec("qwen2-vl"))
    answer = renderer.tokenizer.encode("ok") + [renderer.token_id("<|im_end|>")]

    async def slow(request: httpx.Request) -> httpx.Response:  # both calls are in flight at once
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})
        await asyncio.sleep(0.05)
        return httpx.Response(200, json={"choices": [{"token_ids": answer, "logprobs": [-1.0] * len(answer),
                                                      "finish_reason": "stop"}]})
    client = TrainClient("http://inference", transport=httpx.MockTransport(slow), max_retries=0)
    app = create_interception_app(renderer, client, ImageStore(tmp_path / "store"))
    first = [_user("one?", (1, 2, 3))]
    branches = [first + [{"role": "assistant", "content": "ok"}, _user(text, color)]
                for text, color in (("two?", (4, 5, 6)), ("three?", None))]

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://i") as c:
            url = "/sessions/s/v1/chat/completions"
            assert (await c.post(url, json={"messages": first})).status_code == 200
            posts = await asyncio.gather(*(c.post(url, json={"messages": b}) for b in branches))
            return [p.status_code for p in posts], await c.get("/sessions/s/trace")
    statuses, got = asyncio.run(run())
    # both branches bridged from the first call; the one recorded second does not extend the first branch
    assert statuses == [200, 200] and [len(t.nodes) for t in _traces(got)] == [2, 1]
