"""Rollout loop: bridging with a full-render fallback, the concurrency limit, input order, n=1, async
environments, and groups dropped when their environment fails."""

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

from mmref.client.errors import EnvFailedError, ImageInputError, InferenceServerError
from mmref.client.rollout import (
    ResetCopies,
    play_groups,
    run_group_rollout,
    run_group_rollouts,
    run_rollout,
    run_rollouts,
)
from mmref.client.train_client import Sampling
from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer

SPEC = layout_spec("qwen2-vl")


@pytest.fixture(scope="module")
def renderer():
    return create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=SPEC)


class FakeClient:
    """Answers "ok" + <|im_end|> (or cycles through ``answers``); records prompts, n and peak concurrency."""

    def __init__(self, renderer, delay_s: float = 0.0, short_by: int = 0, answers=("ok",)) -> None:
        tokenizer = renderer.tokenizer
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.answers = [tokenizer.encode(a) + [end] for a in answers]  # completion i of a request: answers[i % len]
        self.delay_s, self.prompts, self.active, self.peak, self.ns = delay_s, [], 0, 0, []
        self.short_by = short_by  # answer this many completions fewer than asked (a faulty server)

    async def generate(self, rendered, sampling):
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(self.delay_s)
        self.active -= 1
        self.prompts.append(list(rendered.token_ids))
        self.ns.append(sampling.n)
        answers = [self.answers[i % len(self.answers)] for i in range(sampling.n - self.short_by)]
        completions = [SimpleNamespace(token_ids=a, logprobs=[-0.1 * (i + 1)] * len(a), finish_reason="stop")
                       for i, a in enumerate(answers)]
        return SimpleNamespace(completions=completions, weight_version=0)


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


def structure(trace):
    return ([(n.prompt_ids, n.completion_ids, n.images, n.num_messages, n.finish_reason, n.weight_version,
              n.temperature) for n in trace.nodes], trace.messages, trace.reward, trace.metrics, trace.group_id)


def test_a_group_with_equal_prompts_asks_once_per_turn_and_matches_separate_rollouts(renderer, tmp_path):
    store, sampling = ImageStore(tmp_path), Sampling(max_tokens=4, temperature=0.7)
    client = FakeClient(renderer)
    group = asyncio.run(run_group_rollout([ScriptedEnv("a", inject_assistant=True) for _ in range(4)], renderer, client,
                                          store, sampling, group_id="g"))
    assert client.ns == [4, 4, 4]  # every member answered alike: each turn is one request for all 4
    alone = [asyncio.run(run_rollout(ScriptedEnv("a", inject_assistant=True), renderer, FakeClient(renderer), store,
                                     sampling, group_id="g")) for _ in range(4)]
    assert [structure(t) for t in group] == [structure(t) for t in alone]
    # member i keeps completion i of the group request: its logprobs, not a copy of the first
    assert [t.nodes[0].completion_logprobs[0] for t in group] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert len({t.rollout_id for t in group}) == 4


def test_members_ask_together_exactly_while_their_prompts_are_equal(renderer, tmp_path):
    client = FakeClient(renderer, answers=["ok", "no", "no"])
    group = asyncio.run(run_group_rollout([ScriptedEnv("a") for _ in range(6)], renderer, client,
                                          ImageStore(tmp_path), Sampling(max_tokens=4)))
    assert sum(client.ns) == 6 * 3 and client.ns[0] == 6  # every member's three turns, turn one as one request
    second = Counter(tuple(t.nodes[1].prompt_ids) for t in group)
    assert sorted(client.ns[1:1 + len(second)]) == sorted(second.values()) and len(second) == 2
    for trace in group:  # every prompt is what a full render of that member's own conversation gives
        for node in trace.nodes:
            assert node.prompt_ids == renderer.render(trace.messages[: node.num_messages]).token_ids


def test_a_group_with_different_openings_plays_each_member_alone(renderer, tmp_path):
    client = FakeClient(renderer)
    group = asyncio.run(run_group_rollout([ScriptedEnv("a"), ScriptedEnv("b")], renderer, client,
                                          ImageStore(tmp_path), Sampling(max_tokens=4)))
    assert client.ns == [1] * 6 and [t.messages[0]["content"] for t in group] == ["hello a", "hello b"]


def test_a_group_request_answered_short_is_an_error_not_a_smaller_group(renderer, tmp_path):
    with pytest.raises(InferenceServerError, match=r"n=3"):
        asyncio.run(run_group_rollout([ScriptedEnv("a") for _ in range(3)], renderer, FakeClient(renderer, short_by=1),
                                      ImageStore(tmp_path), Sampling(max_tokens=4)))


def test_group_rollouts_hold_the_request_limit_and_keep_group_order(renderer, tmp_path):
    client = FakeClient(renderer, delay_s=0.01)
    groups = [[ScriptedEnv(f"e{g}") for _ in range(3)] for g in range(5)]
    traces = asyncio.run(run_group_rollouts(groups, renderer, client, ImageStore(tmp_path), Sampling(max_tokens=4),
                                            concurrency=2, group_ids=[f"g{g}" for g in range(5)]))
    assert client.peak == 2
    assert [[t.messages[0]["content"] for t in group] for group in traces] == [[f"hello e{g}"] * 3 for g in range(5)]
    assert [{t.group_id for t in group} for group in traces] == [{f"g{g}"} for g in range(5)]


class CountingEnv(ScriptedEnv):
    resets = 0

    def reset(self):
        CountingEnv.resets += 1
        return super().reset()


def test_reset_copies_reset_once_and_play_what_same_seed_members_play(renderer, tmp_path):
    store, sampling = ImageStore(tmp_path), Sampling(max_tokens=4)
    CountingEnv.resets = 0
    copied = asyncio.run(run_group_rollout(ResetCopies(CountingEnv("a", inject_assistant=True), 3), renderer,
                                           FakeClient(renderer), store, sampling, group_id="g"))
    assert CountingEnv.resets == 1
    members = asyncio.run(run_group_rollout([ScriptedEnv("a", inject_assistant=True) for _ in range(3)], renderer,
                                            FakeClient(renderer), store, sampling, group_id="g"))
    assert [structure(t) for t in copied] == [structure(t) for t in members]
    # each copy keeps its own episode state: every member played all three turns
    assert [len(t.nodes) for t in copied] == [3, 3, 3]


def test_a_group_of_image_openings_shares_one_prompt_with_the_refs_a_member_alone_gets(renderer, tmp_path):
    from PIL import Image

    class ImageEnv:
        def reset(self):
            return [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (56, 84), (200, 10, 10))},
                                                 {"type": "text", "text": "colour?"}]}]

        def step(self, completion_text):
            return [], 1.0, True

    store, sampling = ImageStore(tmp_path), Sampling(max_tokens=4)
    client = FakeClient(renderer)
    group = asyncio.run(run_group_rollout([ImageEnv() for _ in range(4)], renderer, client, store, sampling))
    alone = asyncio.run(run_rollout(ImageEnv(), renderer, FakeClient(renderer), store, sampling))
    assert client.ns == [4] and all(structure(t)[:3] == structure(alone)[:3] for t in group)
    assert group[0].nodes[0].images and group[0].nodes[0].images == alone.nodes[0].images


class AsyncEnv(ScriptedEnv):
    """ScriptedEnv's episode through async methods, recording ``close``."""

    closed = 0

    async def reset(self):
        await asyncio.sleep(0)
        return ScriptedEnv.reset(self)

    async def step(self, completion_text, tool_calls):
        return ScriptedEnv.step(self, completion_text)

    async def close(self):
        AsyncEnv.closed += 1


def test_an_async_environment_plays_the_episode_a_sync_one_plays_and_is_closed_per_member(renderer, tmp_path):
    store, sampling = ImageStore(tmp_path), Sampling(max_tokens=4)
    AsyncEnv.closed = 0
    played = asyncio.run(run_group_rollout(ResetCopies(AsyncEnv("a"), 3), renderer, FakeClient(renderer), store,
                                           sampling, group_id="g"))
    synced = asyncio.run(run_group_rollout(ResetCopies(ScriptedEnv("a"), 3), renderer, FakeClient(renderer), store,
                                           sampling, group_id="g"))
    assert [structure(t) for t in played] == [structure(t) for t in synced] and AsyncEnv.closed == 3


class FailsOnTurn(ScriptedEnv):
    def step(self, completion_text):
        if self.name == "bad":
            raise ZeroDivisionError("scoring broke")
        return super().step(completion_text)


def test_a_group_whose_environment_raises_is_dropped_and_counted_and_the_others_are_played(renderer, tmp_path):
    groups = [ResetCopies(FailsOnTurn(name), 4) for name in ("a", "bad", "c")]
    batch = asyncio.run(play_groups(groups, renderer, FakeClient(renderer), ImageStore(tmp_path),
                                    Sampling(max_tokens=4), group_ids=["g0", "g1", "g2"]))
    assert [[t.group_id for t in group] for group in batch.groups] == [["g0"] * 4, ["g2"] * 4]
    assert [(d.group_id, d.size) for d in batch.dropped] == [("g1", 4)] and batch.rollouts_dropped == 4
    assert isinstance(batch.dropped[0].error, EnvFailedError)
    assert isinstance(batch.dropped[0].error.__cause__, ZeroDivisionError)
    # strict callers still see the error
    with pytest.raises(EnvFailedError, match=r"FailsOnTurn\.step\(\) raised ZeroDivisionError: scoring broke"):
        asyncio.run(run_group_rollout(ResetCopies(FailsOnTurn("bad"), 2), renderer, FakeClient(renderer),
                                      ImageStore(tmp_path), Sampling(max_tokens=4)))


def test_a_group_whose_images_cannot_become_refs_is_dropped_but_a_server_error_still_raises(renderer, tmp_path):
    class NoRoot(ScriptedEnv):
        def reset(self):
            return [{"role": "user", "content": [{"type": "image", "image": "img/missing.png"}]}]

    batch = asyncio.run(play_groups([ResetCopies(NoRoot("x"), 2), ResetCopies(ScriptedEnv("y"), 2)], renderer,
                                    FakeClient(renderer), ImageStore(tmp_path), Sampling(max_tokens=4)))
    assert len(batch.groups) == 1 and isinstance(batch.dropped[0].error, ImageInputError)
    with pytest.raises(InferenceServerError):
        asyncio.run(play_groups([ResetCopies(ScriptedEnv("y"), 3)], renderer, FakeClient(renderer, short_by=1),
                                ImageStore(tmp_path), Sampling(max_tokens=4)))


def test_a_group_whose_environment_cannot_be_copied_is_dropped(renderer, tmp_path):
    import threading

    class Locked(ScriptedEnv):
        def __init__(self, name):
            super().__init__(name)
            self.lock = threading.Lock()  # neither picklable nor deep-copyable

    batch = asyncio.run(play_groups([ResetCopies(Locked("x"), 2), ResetCopies(ScriptedEnv("y"), 2)], renderer,
                                    FakeClient(renderer), ImageStore(tmp_path), Sampling(max_tokens=4)))
    assert len(batch.groups) == 1 and "cannot be copied" in str(batch.dropped[0].error)
