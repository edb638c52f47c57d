"""Rollout loop: bridging with a full-render fallback, the concurrency limit, input order, n=1."""

import asyncio
from types import SimpleNamespace

import pytest

from mmref.client.rollout import run_rollout, run_rollouts
from mmref.client.train_client import Sampling
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer

SPEC = layout_spec("qwen2-vl")


@pytest.fixture(scope="module")
def renderer():
    return create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=SPEC)


class FakeClient:
    """Answers every prompt with "ok" + <|im_end|>; records prompts and the peak of concurrent calls."""

    def __init__(self, renderer, delay_s: float = 0.0) -> None:
        tokenizer = renderer.tokenizer
        self.answer = tokenizer.encode("ok") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.delay_s, self.prompts, self.active, self.peak = delay_s, [], 0, 0

    async def generate(self, rendered, sampling):
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(self.delay_s)
        self.active -= 1
        self.prompts.append(list(rendered.token_ids))
        completion = SimpleNamespace(token_ids=self.answer, logprobs=[-0.1] * len(self.answer), finish_reason="stop")
        return SimpleNamespace(completions=[completion], weight_version=0)


class ScriptedEnv:
    """Two more turns; turn 2's new messages may include an assistant message (no bridge possible)."""

    def __init__(self, name: str, inject_assistant: bool = False) -> None:
        self.name, self.inject_assistant, self.turn = name, inject_assistant, 0

    def reset(self):
        return [{"role": "user", "content": f"hello {self.name}"}]

    def step(self, completion_text):
        self.turn += 1
        if self.turn == 3:
            return [], 1.0, True
        new = [{"role": "user", "content": f"turn {self.turn}"}]
        if self.inject_assistant and self.turn == 2:
            new = [{"role": "assistant", "content": "an injected reply"}, *new]
        return new, 0.0, False


def test_turns_are_bridged_and_fall_back_to_a_full_render_when_the_bridge_cannot(renderer, tmp_path):
    client = FakeClient(renderer)
    trace = asyncio.run(run_rollout(ScriptedEnv("a", inject_assistant=True), renderer, client,
                                    ImageStore(tmp_path), Sampling(max_tokens=4)))
    assert trace.metrics == {"bridged_turns": 1.0, "full_renders": 2.0}
    # Every prompt, bridged or not, is what a full render of the conversation so far gives.
    for node in trace.nodes:
        full = renderer.render(trace.messages[: node.num_messages], add_generation_prompt=True)
        assert node.prompt_ids == full.token_ids
    assert client.prompts == [n.prompt_ids for n in trace.nodes]


def test_many_rollouts_respect_the_concurrency_limit_and_keep_input_order(renderer, tmp_path):
    client = FakeClient(renderer, delay_s=0.01)
    envs = [ScriptedEnv(f"e{i}") for i in range(12)]
    traces = asyncio.run(run_rollouts(envs, renderer, client, ImageStore(tmp_path), Sampling(max_tokens=4),
                                      concurrency=3, group_ids=[f"g{i // 4}" for i in range(12)]))
    assert client.peak == 3
    assert [t.messages[0]["content"] for t in traces] == [f"hello e{i}" for i in range(12)]
    assert [t.group_id for t in traces] == [f"g{i // 4}" for i in range(12)]


def test_a_rollout_samples_one_completion_per_turn(renderer, tmp_path):
    with pytest.raises(ValueError, match=r"n=1"):
        asyncio.run(run_rollout(ScriptedEnv("a"), renderer, FakeClient(renderer), ImageStore(tmp_path),
                                Sampling(max_tokens=4, n=2)))
