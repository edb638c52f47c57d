"""The interception server's sessions under random interleavings (hypothesis stateful test).

Several agents (API keys, "default" without one; key in the header or in the path) run
conversations with images in any order: new tasks, continued ones (the reply echoed
exactly, edited, or left out; tool results after tool calls), retries and branches, bad
requests, streamed or not. A fake inference server samples what each step asks for (text,
a cut-off text, a tool call). The model of the test keeps, per session, its episodes: a
call continues the current episode when its messages start with the previous call's.

Invariants after every step: no 5xx; every known session's ``GET /sessions/{id}/trace`` is
a 200 whose traces validate as ``Trace``, one per expected episode, with the expected
calls and learning segments (an exactly echoed reply is bridged: one segment); each
episode's trace file is the served trace; answers (streamed or not) are what was sampled.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from PIL import Image

from mmref.client.interception import create_interception_app
from mmref.client.trace import Trace
from mmref.client.train_client import TrainClient
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer
from sse_cases import joined, sse_chunks

RENDERER = create_renderer(qwen2_tokenizer(), "qwen2.5-vl", spec=layout_spec("qwen2.5-vl"))
TOOLS = [{"type": "function", "function": {"name": "zoom", "description": "zoom in",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
KEYS = ["default", "alpha", "b-2", "sk.3"]  # "sk.3" is no safe file name: its trace files are hex-named
ROUTES = ["header", "path"]  # "header" for "default" sends no Authorization at all
SAMPLES = ["text", "cut", "tool"]


class FakeInference:
    """Samples what the test asks for next; answers are numbered so no two are alike."""

    def __init__(self) -> None:
        self.count = 0
        self.kind = "text"

    def expected(self) -> dict:
        """The message (and finish reason) the next answer must come back as."""
        n = self.count
        if self.kind == "tool":
            return {"content": "", "tool_calls": [("zoom", {"x": n})], "finish_reason": "tool_calls"}
        if self.kind == "cut":
            return {"content": f"partial {n}", "tool_calls": [], "finish_reason": "length"}
        return {"content": f"answer {n}", "tool_calls": [], "finish_reason": "stop"}

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 32768}]})
        body = json.loads(request.content)
        pads = sum(t == RENDERER.image_pad_id for t in body["token_ids"])
        assert pads == sum(image["length"] for image in body["images"])  # what a real server checks
        n, self.count = self.count, self.count + 1
        close = [RENDERER.token_id(RENDERER.close_token)]
        if self.kind == "tool":
            text, tail, finish = f'<tool_call>\n{{"name": "zoom", "arguments": {{"x": {n}}}}}\n</tool_call>', close, "stop"
        elif self.kind == "cut":
            text, tail, finish = f"partial {n}", [], "length"
        else:
            text, tail, finish = f"answer {n}", close, "stop"
        ids = RENDERER.tokenizer.encode(text, add_special_tokens=False) + tail
        return httpx.Response(200, json={"choices": [{"token_ids": ids, "logprobs": [-1.0] * len(ids),
                                                      "finish_reason": finish}], "weight_version": 1})


def png(color: tuple[int, int, int], size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


images = st.lists(st.builds(png, st.tuples(*[st.integers(0, 255)] * 3), st.tuples(st.integers(8, 40), st.integers(8, 40))),
                  max_size=2)
texts = st.text(st.sampled_from("abc xyz?\n"), min_size=1, max_size=12)


def user(text: str, urls: list[str]) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}


def read_answer(response: httpx.Response, stream: bool) -> dict:
    """The assistant message and finish reason, from a chat.completion or from its SSE chunks."""
    if not stream:
        choice = response.json()["choices"][0]
        return {**choice["message"], "finish_reason": choice["finish_reason"]}
    chunks = sse_chunks(response)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    return joined(chunks)


class InterceptionSessions(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="mmref-stateful-"))
        self.fake = FakeInference()
        client = TrainClient("http://inference", transport=httpx.MockTransport(self.fake.handle), max_retries=0)
        self.app = create_interception_app(RENDERER, client, ImageStore(self.tmp / "store"),
                                           trace_dir=self.tmp / "traces")
        self.http = TestClient(self.app).__enter__()
        # per session: a list of episodes {"calls", "segments", "request", "reply"}
        self.model: dict[str, list[dict]] = {}

    def teardown(self) -> None:
        self.http.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- driving ------------------------------------------------------------------------

    def post(self, key: str, route: str, body: dict) -> httpx.Response:
        if route == "path":
            response = self.http.post(f"/sessions/{key}/v1/chat/completions", json=body)
        else:
            headers = {} if key == "default" else {"Authorization": f"Bearer {key}"}
            response = self.http.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code < 500, response.text[:500]
        return response

    def call(self, key: str, route: str, messages: list[dict], sample: str, stream: bool, bridged: bool) -> None:
        """Send a valid call; check the answer and advance the model."""
        self.fake.kind = sample
        expected = self.fake.expected()
        response = self.post(key, route, {"model": "m", "messages": messages, "tools": TOOLS, "max_tokens": 16,
                                          "stream": stream})
        assert response.status_code == 200, response.text[:500]
        answer = read_answer(response, stream)
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in answer.get("tool_calls", [])]
        assert (answer["role"], answer["content"], calls, answer["finish_reason"]) == \
            ("assistant", expected["content"], expected["tool_calls"], expected["finish_reason"])
        reply = {"role": "assistant", "content": answer["content"]}  # as an agent echoes it
        if answer.get("tool_calls"):
            reply["tool_calls"] = [{"id": c["id"], "type": c["type"], "function": c["function"]}
                                   for c in answer["tool_calls"]]
        episodes = self.model.setdefault(key, [])
        current = episodes[-1] if episodes else None
        if current is not None and len(messages) > len(current["request"]) \
                and messages[: len(current["request"])] == current["request"]:
            current.update(calls=current["calls"] + 1, segments=current["segments"] + (not bridged),
                           request=messages, reply=reply)
        else:
            episodes.append({"calls": 1, "segments": 1, "request": messages, "reply": reply})

    # -- rules --------------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), route=st.sampled_from(ROUTES), sample=st.sampled_from(SAMPLES),
          stream=st.booleans(), system=st.booleans(), text=texts, urls=images)
    def new_task(self, key, route, sample, stream, system, text, urls):
        messages = ([{"role": "system", "content": "Look closely."}] if system else []) + [user(text, urls)]
        self.call(key, route, messages, sample, stream, bridged=False)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), route=st.sampled_from(ROUTES), sample=st.sampled_from(SAMPLES), stream=st.booleans(),
          echo=st.sampled_from(["exact", "edited", "omitted"]), text=texts, urls=images)
    def continue_task(self, data, route, sample, stream, echo, text, urls):
        key = data.draw(st.sampled_from(sorted(self.model)))
        episode = self.model[key][-1]
        reply = episode["reply"]
        if echo == "edited":
            reply = {"role": "assistant", "content": "(edited) " + reply["content"]}  # differs from the first sampled token
        follow = [{"role": "tool", "tool_call_id": c["id"], "content": f"zoomed {text}"}
                  for c in reply.get("tool_calls", [])] or [user(text, urls)]
        messages = episode["request"] + ([] if echo == "omitted" else [reply]) + follow
        self.call(key, route, messages, sample, stream, bridged=echo == "exact")

    @precondition(lambda self: self.model)
    @rule(data=st.data(), route=st.sampled_from(ROUTES), sample=st.sampled_from(SAMPLES), stream=st.booleans(),
          text=texts)
    def retry_or_branch(self, data, route, sample, stream, text):
        """Resend the last call (a retry), or the same history with another last message (a branch)."""
        key = data.draw(st.sampled_from(sorted(self.model)))
        request = self.model[key][-1]["request"]
        messages = request if data.draw(st.booleans()) else request[:-1] + [user(f"instead {text}", [])]
        self.call(key, route, messages, sample, stream, bridged=False)

    @rule(key=st.sampled_from(KEYS + ["never-valid"]), route=st.sampled_from(ROUTES), stream=st.booleans(),
          bad=st.sampled_from(["http-image", "bad-role", "empty"]))
    def bad_request(self, key, route, stream, bad):
        messages = {"http-image": [user("x", ["https://example.com/cat.png"])],
                    "bad-role": [{"role": "wizard", "content": "x"}], "empty": []}[bad]
        response = self.post(key, route, {"messages": messages, "stream": stream})
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
        if key not in self.model:
            assert self.http.get(f"/sessions/{key}/trace").status_code == 404  # a failed call starts no session

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def traces_match_the_model(self):
        for key, episodes in self.model.items():
            response = self.http.get(f"/sessions/{key}/trace")
            assert response.status_code == 200, response.text[:500]
            traces = [Trace.model_validate(t) for t in response.json()["traces"]]
            assert [t.rollout_id for t in traces] == [f"{key}#{i}" for i in range(len(episodes))]
            assert [(len(t.nodes), len(t.segments())) for t in traces] == \
                [(e["calls"], e["segments"]) for e in episodes]
            assert [len(t.messages) for t in traces] == [len(e["request"]) + 1 for e in episodes]
            name = key if key.replace("-", "").isalnum() else key.encode().hex()
            on_disk = [Trace.from_json((self.tmp / "traces" / f"{name}.{i}.json").read_text())
                       for i in range(len(episodes))]
            assert on_disk == traces


TestInterceptionSessions = InterceptionSessions.TestCase
TestInterceptionSessions.settings = settings(max_examples=20, stateful_step_count=10, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])
