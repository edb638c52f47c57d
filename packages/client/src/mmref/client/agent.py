"""Agent mode: agent code that only knows an OpenAI-compatible ``base_url``, trained on its traces.

An agent plays one rollout against ``base_url`` (its own session of the interception
server) and returns the reward its scoring gives. Two forms are accepted::

    async def my_agent(base_url: str, model: str, seed: int, **args) -> float: ...

    class MyAgent:                                   # built once with [env.args] (+ seed=)
        async def run(self, base_url: str, model: str, seed: int) -> float: ...

The interception server records each session's episodes as traces (refs only, turns
bridged); ``play_agent_groups`` runs ``size`` rollouts per task seed and groups their traces.
An agent that raises, returns no number, or never calls the model fails its group only:
the group is dropped and counted, like an environment that raises.

    batch = await play_agent_groups(agent, seeds, ids, size, host)   # batch.groups, batch.dropped
"""

from __future__ import annotations

import asyncio
import inspect
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mmref.client.environment import describe
from mmref.client.errors import EnvFailedError
from mmref.client.interception import SamplingOverride
from mmref.client.rollout import DroppedGroup, GroupBatch
from mmref.client.trace import Trace
from mmref.client.train_client import TrainClient


@runtime_checkable
class Agent(Protocol):
    """One rollout of agent code against ``base_url``; returns its reward."""

    async def run(self, base_url: str, model: str, seed: int) -> float:
        """Play the task of ``seed`` with the model ``model`` served at ``base_url``."""


@dataclass(frozen=True)
class FunctionAgent:
    """An async function ``fn(base_url, model, seed, **args) -> reward`` as an ``Agent``."""

    name: str
    fn: Callable[..., Any]
    args: Mapping[str, Any]

    async def run(self, base_url: str, model: str, seed: int) -> float:
        return await self.fn(base_url, model, seed, **self.args)

    @property
    def vocabulary(self) -> Any:
        """The function's ``vocabulary`` attribute, if it has one (for the tiny models' tokenizer)."""
        return getattr(self.fn, "vocabulary", None)

    @property
    def chance(self) -> float | None:
        """The function's ``chance`` attribute, if it has one (the reward curve's blind-policy level)."""
        return getattr(self.fn, "chance", None)


def is_agent(obj: Any) -> bool:
    """Whether ``obj`` is an agent (has ``run``) rather than an environment or a source of episodes."""
    return callable(getattr(obj, "run", None)) and not callable(getattr(obj, "episode", None)) \
        and not callable(getattr(obj, "reset", None))


def is_agent_function(fn: Any) -> bool:
    """Whether a factory is itself an agent: an ``async def`` function."""
    return inspect.iscoroutinefunction(fn)


class AgentHost(Protocol):
    """The interception server as agents see it: a URL per session and each session's traces."""

    model: str
    client: TrainClient

    def session_url(self, session: str) -> str:
        """The OpenAI ``base_url`` of ``session`` (``.../sessions/<session>/v1``)."""

    def open_session(self, session: str, sampling: SamplingOverride | None) -> None:
        """Start ``session``; its calls sample with ``sampling`` applied (None: as they ask)."""

    def take_traces(self, session: str, reward: float, group_id: str) -> list[Trace]:
        """The session's episodes as traces with ``reward``, forgetting the session."""


async def run_agent(agent: Agent, host: AgentHost, seed: int, group_id: str,
                    sampling: SamplingOverride | None = None) -> list[Trace]:
    """One rollout in a fresh session; anything the agent raises becomes ``EnvFailedError``."""
    session = f"{group_id}-{uuid.uuid4().hex[:8]}"
    host.open_session(session, sampling)
    try:
        reward = await agent.run(host.session_url(session), host.model, seed)
        if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
            raise TypeError(f"run() must return the reward as a finite number, got {reward!r}")
    except Exception as exc:  # noqa: BLE001 - any failure of agent code drops its group, typed and with its cause
        host.take_traces(session, 0.0, group_id)
        raise EnvFailedError(f"agent {_name(agent)} raised {type(exc).__name__}: {exc}") from exc
    traces = host.take_traces(session, float(reward), group_id)
    if not traces:
        raise EnvFailedError(f"agent {_name(agent)} returned without calling the model at its base_url")
    return traces


async def play_agent_groups(agent: Agent, seeds: Sequence[int], group_ids: Sequence[str], size: int,
                            host: AgentHost, concurrency: int = 64,
                            sampling: SamplingOverride | None = None) -> GroupBatch:
    """``size`` rollouts of each seed, concurrently (at most ``concurrency``); a failed rollout drops its group.

    ``sampling`` is applied to every call of the rollouts (the run's sampling; None: the agent's own).
    """
    limit = asyncio.Semaphore(concurrency)

    async def member(seed: int, gid: str) -> list[Trace]:
        async with limit:
            return await run_agent(agent, host, seed, gid, sampling)

    async def group(seed: int, gid: str) -> list[Trace] | DroppedGroup:
        results = await asyncio.gather(*(member(seed, gid) for _ in range(size)), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            if not isinstance(failed[0], EnvFailedError):
                raise failed[0]
            return DroppedGroup(gid, size, failed[0])
        return [trace for traces in results for trace in traces]

    results = await asyncio.gather(*(group(s, g) for s, g in zip(seeds, group_ids)))
    return GroupBatch([r for r in results if isinstance(r, list)], [r for r in results if isinstance(r, DroppedGroup)])


@dataclass(frozen=True)
class InterceptionHost:
    """An interception app (``create_interception_app``) served at ``url``, as an ``AgentHost``."""

    app: Any
    url: str
    renderer: Any
    model: str
    client: TrainClient  # the app's client of the inference server (its request and byte counters)

    def session_url(self, session: str) -> str:
        return f"{self.url}/sessions/{session}/v1"

    def open_session(self, session: str, sampling: SamplingOverride | None) -> None:
        if sampling is not None:
            self.app.state.overrides[session] = sampling

    def take_traces(self, session: str, reward: float, group_id: str) -> list[Trace]:
        self.app.state.overrides.pop(session, None)
        found = self.app.state.sessions.pop(session, None)
        episodes = range(len(found.episodes)) if found is not None else range(0)
        return [found.trace(self.renderer, i, reward, group_id) for i in episodes]


def _name(agent: Agent) -> str:
    return agent.name if isinstance(agent, FunctionAgent) else describe(agent)
