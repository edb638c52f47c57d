"""Calling environments: sync and async forms alike, tool calls for a step that asks, failures typed."""

import asyncio

import pytest

from mmref.client.environment import Vocabulary, close_env, reset_env, step_env, vocabulary_of
from mmref.client.errors import EnvFailedError
from mmref.renderers.render.base import ParsedResponse, ParsedToolCall

CALL = ParsedToolCall("zoom", {"x": 1}, '{"name": "zoom", "arguments": {"x": 1}}')


class SyncEnv:
    def __init__(self):
        self.closed = False

    def reset(self):
        return [{"role": "user", "content": "hi"}]

    def step(self, text):
        return [], float(text == "ok"), True

    def close(self):
        self.closed = True


class AsyncToolEnv:
    def __init__(self):
        self.calls, self.closed = None, False

    async def reset(self):
        await asyncio.sleep(0)
        return [{"role": "user", "content": "hi"}]

    async def step(self, text, tool_calls):
        self.calls = tool_calls
        return [], 0.5, True

    async def close(self):
        self.closed = True


class KwargsEnv(SyncEnv):
    def step(self, text, **extra):
        self.extra = extra
        return [], 1.0, True


@pytest.mark.parametrize("make", [SyncEnv, AsyncToolEnv], ids=["sync", "async"])
def test_sync_and_async_environments_reset_step_and_close_alike(make):
    env = make()

    async def play():
        opening = await reset_env(env)
        result = await step_env(env, ParsedResponse("ok"))
        await close_env(env)
        return opening, result

    opening, (new, reward, done) = asyncio.run(play())
    assert opening == [{"role": "user", "content": "hi"}] and new == [] and done and reward in (1.0, 0.5)
    assert env.closed


def test_tool_calls_go_to_a_step_that_names_them_or_takes_kwargs_and_never_to_one_that_does_not():
    tool_env, kwargs_env, plain = AsyncToolEnv(), KwargsEnv(), SyncEnv()
    for env in (tool_env, kwargs_env, plain):
        asyncio.run(step_env(env, ParsedResponse("", tool_calls=[CALL])))  # plain would raise TypeError if passed
    assert tool_env.calls == [CALL] and kwargs_env.extra == {"tool_calls": [CALL]}


def test_an_environment_without_close_is_fine():
    class NoClose:
        def reset(self):
            return []

    asyncio.run(close_env(NoClose()))


@pytest.mark.parametrize("method", ["reset", "step", "close"])
def test_whatever_an_environment_raises_becomes_env_failed_naming_the_class_method_and_error(method):
    class Broken(SyncEnv):
        def reset(self):
            raise KeyError("no row") if method == "reset" else None

        def step(self, text):
            raise ValueError("bad reply") if method == "step" else None

        async def close(self):
            raise OSError("socket gone")

    call = {"reset": lambda e: reset_env(e), "step": lambda e: step_env(e, ParsedResponse("x")),
            "close": lambda e: close_env(e)}[method]
    with pytest.raises(EnvFailedError, match=rf"Broken\.{method}\(\) raised \w+Error") as info:
        asyncio.run(call(Broken()))
    assert isinstance(info.value.__cause__, (KeyError, ValueError, OSError))


def test_vocabulary_is_read_from_an_attribute_or_a_method_and_checked():
    words = Vocabulary(words=("a",))

    class Attr:
        vocabulary = words

    class Method:
        def vocabulary(self):
            return words

    class Wrong:
        vocabulary = ("a", "b")

    assert vocabulary_of(Attr()) == vocabulary_of(Method()) == words and vocabulary_of(SyncEnv()) is None
    with pytest.raises(TypeError, match="must be a mmref.client.environment.Vocabulary"):
        vocabulary_of(Wrong())
