"""Agent mode: the example zoom agent (openai SDK, tool calls, images) through the interception server.

The agent runs unchanged against a loopback interception server whose inference server is
scripted (fixed completions), so its trace can be compared token for token with a direct
rollout of the same conversation; then ``mmref rl`` trains a few steps on it.
"""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from live_server import running
from mmref.client.agent import FunctionAgent, InterceptionHost, play_agent_groups, run_agent
from mmref.client.errors import EnvFailedError
from mmref.client.interception import SamplingOverride, create_interception_app
from mmref.client.rollout import run_rollout
from mmref.client.train_client import Sampling, TrainClient
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer
from mmref.trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
AGENT = str(ROOT / "examples" / "zoom_agent.py")


@pytest.fixture(scope="module")
def zoom():
    from mmref.client.envs.loader import resolve_factory
    return resolve_factory(f"{AGENT}:zoom_agent")


@pytest.fixture
def renderer():
    return create_renderer(qwen2_tokenizer(), "qwen2.5-vl", spec=layout_spec("qwen2.5-vl", max_pixels=112 * 112))


def scripted(renderer, answer):
    """A fake inference server: call ``i`` (from 0) samples ``answer(i)`` closed by <|im_end|>."""
    calls = [0]

    def handle(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 16384}]})
        ids = renderer.tokenizer.encode(answer(calls[0]), add_special_tokens=False) + [renderer.token_id("<|im_end|>")]
        calls[0] += 1
        return httpx.Response(200, json={"choices": [{"token_ids": ids, "logprobs": [-0.5] * len(ids),
                                                      "finish_reason": "stop"}], "weight_version": 3})
    return TrainClient("http://inference", transport=httpx.MockTransport(handle), max_retries=0)


class Replay:
    """The agent's conversation as an environment: its opening, then what followed each reply."""

    def __init__(self, messages, tools):
        self.tools = tools
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        self.opening = messages[:replies[0]]
        self.after = [messages[i + 1:j] for i, j in zip(replies, replies[1:] + [len(messages)])]

    def reset(self):
        return self.opening

    def step(self, text):
        new = self.after.pop(0)
        return new, 0.0, not self.after


SCRIPT = ['<tool_call>\n{"name": "zoom", "arguments": {"x": 20, "y": 30, "w": 40, "h": 40}}\n</tool_call>',
          "grey", "It is blue."]


def test_the_agents_trace_equals_a_direct_rollout_of_its_conversation(tmp_path, zoom, renderer):
    store = ImageStore(tmp_path / "store")
    client = scripted(renderer, SCRIPT.__getitem__)
    app = create_interception_app(renderer, client, store, model_name="m")
    with running(app) as url:
        host = InterceptionHost(app, url, renderer, "m", client)
        [trace] = asyncio.run(run_agent(FunctionAgent("zoom", zoom, {}), host, seed=5, group_id="g"))
    _, colour = zoom.__globals__["picture"](5)
    assert trace.reward == float(colour == "blue") and trace.group_id == "g" and not app.state.sessions
    # turn 1: the small view; turn 2: + the zoomed crop (a tool message); turn 3: + a reminder
    assert [len(n.images) for n in trace.nodes] == [1, 2, 2]
    assert [m["role"] for m in trace.messages] == ["system", "user", "assistant", "tool", "assistant", "user",
                                                   "assistant"]
    assert len(trace.segments()) == 1  # every turn bridged: one sequence, replies verbatim

    env = Replay(trace.messages, zoom.__globals__["TOOLS"])
    direct = asyncio.run(run_rollout(env, renderer, scripted(renderer, SCRIPT.__getitem__), store,
                                     Sampling(temperature=1.0, max_tokens=24)))
    assert [(n.prompt_ids, n.completion_ids, n.images) for n in trace.nodes] == \
        [(n.prompt_ids, n.completion_ids, n.images) for n in direct.nodes]
    [ours], [theirs] = trace.segments(), direct.segments()
    assert (ours.token_ids, ours.sampled_mask, ours.turns, ours.images, ours.logprobs) == \
        (theirs.token_ids, theirs.sampled_mask, theirs.turns, theirs.images, theirs.logprobs)


def test_a_crash_inside_agent_code_fails_its_group_only(tmp_path, zoom, renderer):
    runs = {}

    async def crashy(base_url, model, seed):
        runs[seed] = runs.get(seed, 0) + 1
        reward = await zoom(base_url, model, seed, max_turns=1)
        if seed == 1 and runs[seed] == 2:  # the second member of seed 1's group, after its model call
            raise RuntimeError("the scorer crashed")
        return reward

    store = ImageStore(tmp_path / "store")
    client = scripted(renderer, lambda i: "red")
    app = create_interception_app(renderer, client, store, model_name="m")
    with running(app) as url:
        host = InterceptionHost(app, url, renderer, "m", client)
        batch = asyncio.run(play_agent_groups(FunctionAgent("crashy", crashy, {}), [0, 1, 2], ["a", "b", "c"], 2,
                                              host))
    assert [[t.group_id for t in g] for g in batch.groups] == [["a", "a"], ["c", "c"]]
    [dropped] = batch.dropped
    assert (dropped.group_id, dropped.size, batch.rollouts_dropped) == ("b", 2, 2)
    assert isinstance(dropped.error, EnvFailedError) and "RuntimeError: the scorer crashed" in str(dropped.error)
    assert not app.state.sessions  # the crashed rollout's session is not kept either


@pytest.mark.parametrize("override", [None, SamplingOverride(temperature=1.0, top_p=1.0, max_tokens=4)])
def test_the_runs_sampling_applies_to_agent_calls_unless_the_agent_keeps_its_own(tmp_path, renderer, override):
    asked = []

    def handle(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 16384}]})
        asked.append(json.loads(request.content)["sampling"])
        ids = renderer.tokenizer.encode("red", add_special_tokens=False) + [renderer.token_id("<|im_end|>")]
        return httpx.Response(200, json={"choices": [{"token_ids": ids, "logprobs": [-0.5] * len(ids),
                                                      "finish_reason": "stop"}], "weight_version": 0})

    async def agent(base_url, model, seed):
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{base_url}/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "colour?"}],
                "temperature": 0.3, "top_p": 0.5, "max_tokens": 50})
        return float(answer.json()["choices"][0]["message"]["content"] == "red")

    client = TrainClient("http://inference", transport=httpx.MockTransport(handle), max_retries=0)
    app = create_interception_app(renderer, client, ImageStore(tmp_path / "store"), model_name="m")
    with running(app) as url:
        host = InterceptionHost(app, url, renderer, "m", client)
        batch = asyncio.run(play_agent_groups(FunctionAgent("a", agent, {}), [0], ["g"], 2, host, sampling=override))
    expected = (0.3, 0.5, 50) if override is None else (1.0, 1.0, 4)
    assert [(a["temperature"], a["top_p"], a["max_tokens"]) for a in asked] == [expected] * 2
    assert [t.nodes[0].temperature for t in batch.traces] == [expected[0]] * 2  # the trainer scores at it
    assert [t.reward for t in batch.traces] == [1.0, 1.0] and not app.state.overrides


@pytest.mark.timeout(300)
def test_mmref_rl_trains_and_evaluates_a_few_steps_on_the_zoom_agent(tmp_path):
    out = tmp_path / "run"
    assert main(["rl", str(ROOT / "examples" / "zoom-agent.toml"), "--output-dir", str(out), "--max-steps", "2",
                 "--set", f"env.name={json.dumps(AGENT + ':zoom_agent')}", "--set", "rollout.prompts_per_step=2",
                 "--set", "rollout.group_size=2", "--set", "eval.every=2", "--set", "eval.num_examples=3"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["rollouts"], m["rollouts_dropped"]) for m in metrics] == [(0, 4, 0), (1, 4, 0)]
    assert all(m["loss_tokens"] > 0 and m["images_processed"] >= 1 and m["rollout_requests"] >= 4
               and m["request_bytes"] > 0 for m in metrics)  # the agents' calls, counted by the host
    assert [(e["weight_version"], e["rollouts"]) for e in metrics[-1]["evals"]] == [(2, 3)]  # agents evaluate too
    turns = [json.loads(line)["turns"] for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert turns and all(t[0]["user_text"] == "Which colour is the square?" and len(t[0]["images"]) == 1
                         for t in turns)
