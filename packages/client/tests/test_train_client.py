"""TrainClient: wire format, bounded retries with backoff, no retry on 4xx, length check."""

import asyncio
import json
from types import SimpleNamespace
from dataclasses import dataclass, field

import httpx
import pytest

from mmref.client.errors import InferenceRequestError, InferenceServerError, InferenceUnavailableError
from mmref.client.train_client import Sampling, TrainClient


@dataclass
class Rendered:
    token_ids: list = field(default_factory=lambda: [1, 2, 3])
    images: list = field(default_factory=list)


def server(responses, seen, models_calls=None):
    """A stand-in inference server answering generate calls from ``responses`` in order."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            if models_calls is not None:
                models_calls.append(1)
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 64}]})
        seen.append(json.loads(request.content))
        status, body = responses.pop(0)
        if status == "drop":
            raise httpx.ConnectError("connection refused")
        if status == "slow":
            raise httpx.ReadTimeout("read timed out")
        return httpx.Response(status, json=body)
    return httpx.MockTransport(handle)


OK = (200, {"choices": [{"token_ids": [5, 6], "logprobs": [-0.1, -0.2], "finish_reason": "stop"}], "weight_version": 3})


def run(client_kwargs, responses, rendered=None, sampling=Sampling(max_tokens=4)):
    seen = []

    async def go():
        async with TrainClient("http://inference", transport=server(responses, seen), backoff_s=0.001,
                               **client_kwargs) as client:
            return await client.generate(rendered or Rendered(), sampling), client
    result, client = asyncio.run(go())
    return result, client, seen


def test_generate_sends_tokens_slots_and_sampling():
    result, client, seen = run({}, [OK], sampling=Sampling(max_tokens=4, n=1, seed=9))
    assert seen[0] == {"token_ids": [1, 2, 3], "images": [], "sampling": {
        "temperature": 1.0, "top_p": 1.0, "max_tokens": 4, "stop_token_ids": [], "n": 1, "seed": 9}}
    assert result.completions[0].token_ids == [5, 6] and result.weight_version == 3


def test_connection_errors_and_503_are_retried_within_bounds():
    result, client, _ = run({"max_retries": 3}, [("drop", None), (503, {"error": {"message": "busy"}}), OK])
    assert result.completions[0].logprobs == [-0.1, -0.2] and client.retries == 2


def test_retries_are_bounded_and_name_the_last_error():
    with pytest.raises(InferenceUnavailableError, match="after 3 attempts; last error: HTTP 503: busy"):
        run({"max_retries": 2}, [(503, {"error": {"message": "busy"}})] * 3)


def test_4xx_is_never_retried_and_surfaces_the_message():
    with pytest.raises(InferenceRequestError, match="HTTP 400.*slot 0 is bad") as info:
        run({"max_retries": 5}, [(400, {"error": {"message": "slot 0 is bad"}}), OK])
    assert info.value.status == 400


def test_prompt_too_long_fails_before_any_generate_call():
    seen = []
    with pytest.raises(InferenceRequestError, match="exceeds the server's max_model_len 64"):
        run({}, [OK], rendered=Rendered(token_ids=list(range(62))), sampling=Sampling(max_tokens=4))
    assert seen == []


def test_read_timeouts_are_retried_like_connection_errors():
    result, client, _ = run({"max_retries": 2}, [("slow", None), OK])
    assert result.completions[0].token_ids == [5, 6] and client.retries == 1


def test_a_500_is_an_upstream_failure_not_retried_and_not_the_callers_fault():
    with pytest.raises(InferenceServerError, match="HTTP 500.*engine exploded") as info:
        run({"max_retries": 5}, [(500, {"error": {"message": "engine exploded"}}), OK])
    assert info.value.status == 500 and not isinstance(info.value, InferenceRequestError)


def test_image_slots_go_on_the_wire_as_ref_offset_length():
    from mmref.renderers import ImageSlot, layout_spec, make_ref

    stored = SimpleNamespace(sha256="ab" * 32, asset="ab" * 8 + ".png", media_type="image/png", width=56, height=56)
    ref = make_ref(layout_spec("qwen2-vl"), stored)
    slot = ImageSlot(ref=ref, offset=1, length=ref.num_tokens)
    _, _, seen = run({}, [OK], rendered=Rendered(token_ids=[0] * (ref.num_tokens + 2), images=[slot]))
    assert seen[0]["images"] == [{"ref": ref.encode(), "offset": 1, "length": ref.num_tokens}]


def test_max_model_len_is_fetched_once_and_cached_also_by_concurrent_first_requests():
    calls, seen = [], []

    answer = server([OK] * 4, seen, calls).handler

    async def slow_models(request):  # the server takes a moment: the first requests all wait on it
        if request.url.path == "/v1/models":
            await asyncio.sleep(0.01)
        return answer(request)

    async def go():
        async with TrainClient("http://inference", transport=httpx.MockTransport(slow_models),
                               backoff_s=0.001) as client:
            await asyncio.gather(*(client.generate(Rendered(), Sampling(max_tokens=4)) for _ in range(3)))
            await client.generate(Rendered(), Sampling(max_tokens=4))
    asyncio.run(go())
    assert len(seen) == 4 and len(calls) == 1  # concurrent first requests wait for the one /v1/models call


def test_a_response_with_fewer_completions_than_n_is_a_server_error():
    with pytest.raises(InferenceServerError, match=r"1 completions for n=3"):
        run({}, [OK], sampling=Sampling(max_tokens=4, n=3))


def test_idle_connections_are_kept_for_every_concurrent_request():
    """Two waves of 30 concurrent requests on 30 connections open 30, not 30 + the 10 httpx's default pool of 20
    idle connections drops."""
    opened, arrived = [], []
    waves = {1: asyncio.Event(), 2: asyncio.Event()}
    body = json.dumps(OK[1]).encode()
    models = json.dumps({"data": [{"id": "m", "max_model_len": 64}]}).encode()

    async def handle(reader, writer):
        opened.append(1)
        try:
            await serve(reader, writer)
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):  # the client hung up
            writer.close()

    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), b"0"))
            await reader.readexactly(length)
            if head.startswith(b"POST"):  # answer once the whole wave of 30 is in flight
                arrived.append(1)
                wave = (len(arrived) + 29) // 30
                if len(arrived) % 30 == 0:
                    waves[wave].set()
                await waves[wave].wait()
            payload = models if head.startswith(b"GET") else body
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            await writer.drain()

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, TrainClient(f"http://127.0.0.1:{port}", max_connections=30) as client:
            await client.max_model_len()
            for _ in range(2):
                await asyncio.gather(*(client.generate(Rendered(), Sampling(max_tokens=4)) for _ in range(30)))
            return client.requests

    requests = asyncio.run(go())
    assert requests == 61 and len(opened) == 30


def batched(results_of, seen):
    """A stand-in server for batch requests: ``results_of(bodies)`` gives the response JSON."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 64}]})
        assert request.url.path == "/inference/v1/generate_batch"
        bodies = json.loads(request.content)["requests"]
        seen.append(bodies)
        return httpx.Response(200, json=results_of(bodies))
    return httpx.MockTransport(handle)


def generate_all(client, prompts, sampling=Sampling(n=1)):
    async def run():
        async with client:
            return await asyncio.gather(*(client.generate(Rendered(token_ids=p), sampling) for p in prompts),
                                        return_exceptions=True)
    return asyncio.run(run())


def test_calls_made_together_go_out_as_one_batch_and_each_gets_its_own_answer():
    seen = []

    def answer(bodies):  # echo each prompt's last id back as its completion
        return {"results": [{"status": 200, "body": {"choices": [{"token_ids": [b["token_ids"][-1]], "logprobs": [-1.0],
                                                                  "finish_reason": "stop"}], "weight_version": 7}}
                            for b in bodies]}

    client = TrainClient("http://s", transport=batched(answer, seen), batch=True)
    results = generate_all(client, [[1, 2, 10 + i] for i in range(5)])
    assert [len(bodies) for bodies in seen] == [5] and client.requests == 2  # /v1/models + one batch
    assert [r.completions[0].token_ids for r in results] == [[10 + i] for i in range(5)]
    assert {r.weight_version for r in results} == {7}


def test_a_batch_larger_than_max_batch_is_split():
    seen = []
    ok = {"status": 200, "body": OK[1]}
    client = TrainClient("http://s", transport=batched(lambda bodies: {"results": [ok] * len(bodies)}, seen),
                         batch=True, max_batch=4)
    results = generate_all(client, [[1, 2, 3]] * 10)
    assert [len(bodies) for bodies in seen] == [4, 4, 2] and all(r.completions for r in results)


def test_a_bad_request_in_a_batch_fails_alone_with_its_typed_error():
    def answer(bodies):
        return {"results": [{"status": 400, "body": {"error": {"message": "image slot 0: bad ref"}}}
                            if b["token_ids"][0] == 9 else {"status": 200, "body": OK[1]} for b in bodies]}

    results = generate_all(TrainClient("http://s", transport=batched(answer, []), batch=True),
                           [[1, 2], [9, 2], [1, 3]])
    assert isinstance(results[1], InferenceRequestError) and "image slot 0: bad ref" in str(results[1])
    assert results[1].status == 400
    assert [r.completions[0].token_ids for r in (results[0], results[2])] == [[5, 6], [5, 6]]


@pytest.mark.parametrize("answer", [{"results": []}, {"nothing": 1}, {"results": [{"status": "x"}]}])
def test_a_malformed_batch_answer_fails_every_call_as_a_server_error(answer):
    results = generate_all(TrainClient("http://s", transport=batched(lambda bodies: answer, []), batch=True),
                           [[1, 2], [3, 4]])
    assert all(isinstance(r, InferenceServerError) for r in results), results
