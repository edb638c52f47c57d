"""Agent code written for the OpenAI SDK runs unchanged against the interception server.

Both servers run with uvicorn on loopback: interception -> inference (tiny Qwen2-VL).
"""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from mmref.client.interception import create_interception_app
from mmref.client.trace import Trace
from mmref.client.train_client import TrainClient
from mmref.renderers import ImageStore
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
    assert Trace.from_msgpack(trace.to_msgpack()) == trace
    assert [len(n.images) for n in trace.nodes] == [1, 2, 3]
    (segment,) = trace.segments()  # every turn bridged: one sequence to learn from
    assert sum(segment.sampled_mask) == sum(len(n.completion_ids) for n in trace.nodes)
    assert len(list((tmp_path / "store").iterdir())) == 3  # three images, stored once each
