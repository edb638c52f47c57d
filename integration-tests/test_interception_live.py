"""Agent code written for the OpenAI SDK runs unchanged against the interception server.

The servers run with uvicorn on loopback: interception -> inference (tiny Qwen2-VL), or
interception -> a fake inference server that samples a fixed tool call.
"""

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from mmref.client.interception import create_interception_app
from mmref.client.trace import Trace
from mmref.client.train_client import TrainClient
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer
from mmref.trainer.inference import create_app, load_served_model
from live_server import running


def data_url(color, size=(64, 48)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.timeout(300)
def test_openai_sdk_multi_turn_with_images_records_a_bridged_trace(tmp_path):
    store = ImageStore(tmp_path / "store")
    served = load_served_model("tiny-qwen2-vl", max_pixels=128 * 128)
    renderer = create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=served.spec)
    with running(create_app(served, store)) as inference_url:
        app = create_interception_app(renderer, TrainClient(inference_url), store)
        with running(app) as url:
            sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="episode-1", max_retries=0)
            messages = [{"role": "system", "content": "Name the colour."}]
            for turn, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
                messages.append({"role": "user", "content": [
                    {"type": "text", "text": f"turn {turn}"},
                    {"type": "image_url", "image_url": {"url": data_url(color, (64 + 16 * turn, 48))}}]})
                reply = sdk.chat.completions.create(model="mmref", messages=messages, max_tokens=5, seed=turn)
                assert reply.choices[0].message.role == "assistant"
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})

            with pytest.raises(openai.BadRequestError) as bad:
                sdk.chat.completions.create(model="mmref", max_tokens=5, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
            assert "never fetched" in bad.value.body["message"]
            assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "mmref"
            session = app.state.sessions["episode-1"]
            trace = session.trace(renderer)

            # A second task with the same key does not extend the first: a new episode, never a 500.
            sdk.chat.completions.create(model="mmref", max_tokens=5, messages=messages[1:2])
            served_traces = httpx.get(f"{url}/sessions/episode-1/trace")
            assert served_traces.status_code == 200
            assert [len(Trace.model_validate(t).nodes) for t in served_traces.json()["traces"]] == [3, 1]

            # stream=True: the chunks join to the answer the same (greedy) call gives unstreamed.
            ask = {"model": "mmref", "messages": messages[:2], "max_tokens": 8, "temperature": 0, "seed": 5}
            plain = openai.OpenAI(base_url=f"{url}/v1", api_key="plain", max_retries=0).chat.completions.create(**ask)
            streamer = openai.OpenAI(base_url=f"{url}/v1", api_key="streamed", max_retries=0)
            chunks = list(streamer.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage == plain.usage
    assert Trace.from_msgpack(trace.to_msgpack()) == trace
    assert [len(n.images) for n in trace.nodes] == [1, 2, 3]
    (segment,) = trace.segments()  # every turn bridged: one sequence to learn from
    assert sum(segment.sampled_mask) == sum(len(n.completion_ids) for n in trace.nodes)
    assert len(list((tmp_path / "store").iterdir())) == 3  # three images, stored once each


TOOLS = [{"type": "function", "function": {"name": "zoom", "description": "Zoom into the image.", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}, "why": {"type": "string"}}, "required": ["x"]}}}]


def sampling(renderer, answers):
    """A fake inference server that samples ``answers`` in turn (each closed by <|im_end|>)."""
    queue = list(answers)

    def handle(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 8192}]})
        ids = renderer.tokenizer.encode(queue.pop(0), add_special_tokens=False) + [renderer.token_id("<|im_end|>")]
        return httpx.Response(200, json={"choices": [{"token_ids": ids, "logprobs": [-0.1] * len(ids),
                                                      "finish_reason": "stop"}], "weight_version": 1})
    return httpx.MockTransport(handle)


@pytest.mark.timeout(120)
def test_openai_sdk_streams_a_tool_call_and_the_agent_continues_the_episode(tmp_path):
    renderer = create_renderer(qwen2_tokenizer(), "qwen2.5-vl", spec=layout_spec("qwen2.5-vl"))
    call = '<tool_call>\n{"name": "zoom", "arguments": {"x": 3, "why": "the dot é"}}\n</tool_call>'
    client = TrainClient("http://inference", transport=sampling(renderer, [call, call, call, "It is red."]),
                         max_retries=0)
    app = create_interception_app(renderer, client, ImageStore(tmp_path / "store"))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour is the dot?"},
                                             {"type": "image_url", "image_url": {"url": data_url((200, 0, 0))}}]}]
    with running(app) as url:
        plain = openai.OpenAI(base_url=f"{url}/v1", api_key="plain", max_retries=0).chat.completions.create(
            model="mmref", messages=messages, tools=TOOLS)
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="agent", max_retries=0)
        chunks = list(sdk.chat.completions.create(model="mmref", messages=messages, tools=TOOLS, stream=True))
        with sdk.chat.completions.stream(model="mmref", messages=messages, tools=TOOLS) as stream:
            helper = stream.get_final_completion()  # the SDK's own accumulation of the chunks
        calls: dict[int, dict] = {}
        for chunk in chunks:
            for delta in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                entry["name"] += (delta.function and delta.function.name) or ""
                entry["arguments"] += (delta.function and delta.function.arguments) or ""
        (streamed,) = calls.values()
        expected = plain.choices[0].message.tool_calls[0]
        assert (streamed["name"], json.loads(streamed["arguments"])) == ("zoom", {"x": 3, "why": "the dot é"})
        assert streamed["arguments"] == expected.function.arguments
        assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason == "tool_calls"
        helped = helper.choices[0].message.tool_calls[0].function
        assert (helped.name, helped.arguments) == (expected.function.name, expected.function.arguments)
        assert helper.choices[0].message.content == plain.choices[0].message.content

        # The agent echoes the (helper-accumulated) reply and the tool's result: the same episode, bridged.
        reply = helper.choices[0].message
        messages += [reply.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "red"}]
        final = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model="mmref", messages=messages, tools=TOOLS, stream=True))
        assert final == "It is red."
        served = httpx.get(f"{url}/sessions/agent/trace").json()["traces"]
    episodes = [Trace.model_validate(t) for t in served]
    # create(stream) and stream() sent the same first request: a retry, so its own episode
    assert [len(t.nodes) for t in episodes] == [1, 2]
    assert len(episodes[1].segments()) == 1 and episodes[1].messages[-1]["content"] == "It is red."
