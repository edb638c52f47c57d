"""What a rollout needs of an environment, and the calls that accept its sync and async forms alike.

An environment plays one episode. Both forms below are accepted; ``tool_calls`` (the calls
the renderer parsed from the reply) is passed only to a ``step`` whose signature names it,
and ``close`` is optional::

    class Async:                                    class Sync:
        async def reset(self) -> list[dict]: ...        def reset(self) -> list[dict]: ...
        async def step(self, text, tool_calls):         def step(self, text):
            return new_messages, reward, done               return new_messages, reward, done
        async def close(self) -> None: ...

An environment may list OpenAI-style ``tools`` (attribute): its prompts are rendered with
them, as a chat request with ``tools=`` is. Messages are OpenAI-style. Image parts may hold data URLs, PIL images, or paths relative to
the environment's ``image_root`` attribute (read by the client, never by the server).

An ``EnvironmentSource`` makes the episodes of a run (``episode(seed)``); it may also give
the words its task uses (``vocabulary``), the reward of a blind policy (``chance``) and a
data position (``state_dict``/``load_state_dict``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mmref.client.errors import EnvFailedError
from mmref.renderers.render.base import ParsedResponse, ParsedToolCall

Messages = list[dict[str, Any]]
StepResult = tuple[Messages, float, bool]


@runtime_checkable
class Environment(Protocol):
    """One episode of a task: ``reset`` opens it, ``step`` reacts to each reply (sync or async)."""

    def reset(self) -> Messages:
        """The opening messages."""

    def step(self, completion_text: str) -> StepResult:
        """React to the model's answer: (new messages, reward so far, done)."""


@dataclass(frozen=True)
class Vocabulary:
    """The text a task shows and expects, for tokenizers built from it (the tiny CPU models).

    ``words`` become single tokens first (answers: a one-word answer is one sampled token),
    ``prompt_words`` after the chat roles, and ``text`` adds only its characters.

        >>> Vocabulary(words=("red", "blue"), prompt_words=("codeword",), text="Name the colour.")
    """

    words: tuple[str, ...] = ()
    prompt_words: tuple[str, ...] = ()
    text: str = ""


@runtime_checkable
class EnvironmentSource(Protocol):
    """The episodes of a run: ``episode(seed)`` is a fresh environment (seeded ones play alike per seed)."""

    def episode(self, seed: int) -> Environment:
        """A new episode."""


def vocabulary_of(obj: Any) -> Vocabulary | None:
    """``obj.vocabulary`` (attribute or method), or None when it has none."""
    vocabulary = getattr(obj, "vocabulary", None)
    if callable(vocabulary):
        vocabulary = vocabulary()
    if vocabulary is not None and not isinstance(vocabulary, Vocabulary):
        raise TypeError(f"{type(obj).__name__}.vocabulary must be a mmref.client.environment.Vocabulary, "
                        f"got {type(vocabulary).__name__}")
    return vocabulary


def image_root_of(env: Any) -> Path | None:
    """The directory that relative image paths in ``env``'s messages are read from, if it names one."""
    root = getattr(env, "image_root", None)
    return Path(root) if root is not None else None


def tools_of(env: Any) -> list[dict[str, Any]] | None:
    """``env.tools``, the OpenAI-style tool definitions its prompts render with, or None."""
    return getattr(env, "tools", None) or None


def describe(env: Any) -> str:
    """``module.Class`` of an environment, for error messages."""
    kind = type(env)
    return f"{kind.__module__}.{kind.__qualname__}"


async def reset_env(env: Any) -> Messages:
    """``env.reset()``, awaited if async; anything it raises becomes ``EnvFailedError``."""
    return await _call(env, "reset", ())


async def step_env(env: Any, reply: ParsedResponse) -> StepResult:
    """``env.step(text[, tool_calls=...])``, awaited if async; anything it raises becomes ``EnvFailedError``."""
    kwargs = {"tool_calls": list(reply.tool_calls)} if _takes_tool_calls(env) else {}
    return await _call(env, "step", (reply.content,), kwargs)


async def close_env(env: Any) -> None:
    """``env.close()`` if it has one, awaited if async."""
    if callable(getattr(env, "close", None)):
        await _call(env, "close", ())


async def _call(env: Any, method: str, args: tuple, kwargs: dict | None = None) -> Any:
    try:
        result = getattr(env, method)(*args, **(kwargs or {}))
        if inspect.isawaitable(result):
            result = await result
        return result
    except Exception as exc:  # noqa: BLE001 - any failure of user code drops the rollout, typed and with its cause
        raise EnvFailedError(f"environment {describe(env)}.{method}() raised {type(exc).__name__}: {exc}") from exc


def accepts_keyword(fn: Any, name: str, named: bool = False) -> bool:
    """Whether ``fn`` takes keyword ``name``: a parameter of that name, or (unless ``named``) ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == name or (p.kind is p.VAR_KEYWORD and not named) for p in params)


@functools.cache
def _step_takes_tool_calls(kind: type) -> bool:
    return accepts_keyword(kind.step, "tool_calls")


def _takes_tool_calls(env: Any) -> bool:
    """Whether ``env.step`` accepts ``tool_calls``; looked up once per class."""
    return _step_takes_tool_calls(type(env))


__all__ = ["Environment", "EnvironmentSource", "Messages", "ParsedToolCall", "StepResult", "Vocabulary",
           "accepts_keyword", "close_env", "describe", "image_root_of", "reset_env", "step_env", "tools_of",
           "vocabulary_of"]
