"""Multi-turn rollouts: an environment, the renderer, the inference server, and a trace.

Each turn is rendered by bridging (the previous prompt and completion verbatim, then the
environment's new messages), falling back to a full render when the bridge returns None.
Images from the environment become store refs first (``prepare_images``).

    trace = await run_rollout(env, renderer, client, store, sampling)
    traces = await run_rollouts(envs, renderer, client, store, sampling, concurrency=64)
    group = await run_group_rollout(envs, renderer, client, store, sampling)   # GRPO: G copies of one prompt
    group = await run_group_rollout(ResetCopies(env, 8), renderer, client, store, sampling)  # one reset, copied

Environments are sync or async (``mmref.client.environment``); one that raises fails its
rollout with ``EnvFailedError``. ``play_groups`` drops such a group and reports it instead:

    batch = await play_groups(groups, renderer, client, store, sampling)   # batch.groups, batch.dropped

Members of a group whose prompts are equal (token ids and images) at a turn ask for them as
one ``n = k`` request (``GroupRequests``): one HTTP call and one prompt prefill instead of k.
Turn one of same-seed members is one ``n = G`` request (on the learnability run, 32 requests
a step instead of 256); on color-codeword, members that gave the same answer share turn two.
The traces are the same as G ``run_rollout`` calls would make.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import pickle
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from typing import Any

from mmref.client.environment import Environment, close_env, describe, image_root_of, reset_env, step_env, tools_of
from mmref.client.errors import EnvFailedError, ImageInputError, InferenceServerError
from mmref.client.images import prepare_images
from mmref.client.trace import Trace, TraceNode
from mmref.client.train_client import Completion, Sampling, TrainClient
from mmref.renderers.store import ImageStore


@dataclasses.dataclass
class RolloutClock:
    """Seconds rollouts spent in the client's own synchronous work (``perf_counter`` sums).

    ``env_s``: the environment's ``reset``/``step``; ``render_s``: preparing images, rendering,
    bridging and parsing replies. What is left of a batch's wall time is waiting on the server.
    """

    env_s: float = 0.0
    render_s: float = 0.0

    @contextmanager
    def timing(self, field: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, field, getattr(self, field) + time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class ResetCopies:
    """A group of ``size`` episodes of one environment: ``env`` is reset once, then deep-copied per member.

    For environments whose episode is set by their state at reset (seeded ones): the copies
    play what ``size`` same-seed instances would, for one reset instead of ``size``
    (color-codeword draws and PNG-encodes an image in ``reset``: 256 resets a step took
    0.1-0.4 s against a 35 ms bare training step).
    """

    env: Environment
    size: int

    async def reset(self) -> tuple[list[Environment], list[list[dict[str, Any]]]]:
        """The members (``env`` first, then copies) and their opening messages."""
        if self.size < 1:
            raise ValueError(f"a group needs at least one member, got size={self.size}")
        opening = await reset_env(self.env)
        return [self.env, *_copies(self.env, self.size - 1)], [opening] * self.size


def _copies(env: Environment, count: int) -> list[Environment]:
    """``count`` deep copies: pickled once and loaded ``count`` times where it can (color-codeword's
    random state made one pickle a copy cost 0.1 s a learnability step), else ``copy.deepcopy`` each."""
    try:
        blob = pickle.dumps(env, protocol=pickle.HIGHEST_PROTOCOL)
        return [pickle.loads(blob) for _ in range(count)]
    except (pickle.PicklingError, TypeError, AttributeError):  # unpicklable state (locks, local classes)
        try:
            return [copy.deepcopy(env) for _ in range(count)]
        except Exception as exc:  # noqa: BLE001 - an env that cannot be copied fails its group, not the run
            raise EnvFailedError(f"environment {describe(env)} cannot be copied for the members of its group: "
                                 f"{type(exc).__name__}: {exc}") from exc


async def run_rollout(env: Environment, renderer: Any, client: TrainClient, store: ImageStore, sampling: Sampling,
                      max_turns: int = 32, group_id: str | None = None) -> Trace:
    """Play one episode; every model call becomes a trace node."""
    _check_one_per_turn(sampling)
    messages, _ = prepare_images(await reset_env(env), store, renderer.spec, image_root_of(env))
    requests = GroupRequests(1, client, sampling, nullcontext(), group_id)
    return await _play(env, messages, renderer.render(messages, tools=tools_of(env)), requests, renderer, store,
                       max_turns, group_id, RolloutClock())


async def run_group_rollout(envs: Sequence[Environment] | ResetCopies, renderer: Any, client: TrainClient,
                            store: ImageStore, sampling: Sampling, max_turns: int = 32, group_id: str | None = None,
                            limit: AbstractAsyncContextManager | None = None,
                            clock: RolloutClock | None = None) -> list[Trace]:
    """Play a group of episodes; members with equal prompts at a turn share one ``n = k`` request.

    ``envs`` may be ``ResetCopies`` (one reset, copied). ``limit`` (a semaphore) is held around
    each request to the server; ``clock`` collects the client-side seconds. Results are in
    member order.
    """
    _check_one_per_turn(sampling)
    limit = limit if limit is not None else nullcontext()
    clock = clock if clock is not None else RolloutClock()
    with clock.timing("env_s"):
        if isinstance(envs, ResetCopies):
            envs, openings = await envs.reset()
        else:
            openings = [await reset_env(env) for env in envs]
    with clock.timing("render_s"):
        if openings and all(o == openings[0] for o in openings[1:]):  # equal bytes: prepare and render once
            prepared = [prepare_images(openings[0], store, renderer.spec, image_root_of(envs[0]))[0]] * len(openings)
            rendered = [renderer.render(prepared[0], tools=tools_of(envs[0]))] * len(openings)
        else:
            prepared = [prepare_images(o, store, renderer.spec, image_root_of(e))[0] for o, e in zip(openings, envs)]
            rendered = [renderer.render(m, tools=tools_of(e)) for m, e in zip(prepared, envs)]
    requests = GroupRequests(len(envs), client, sampling, limit, group_id)
    plays = [_play(env, list(messages), tokens, requests, renderer, store, max_turns, group_id, clock)
             for env, messages, tokens in zip(envs, prepared, rendered)]
    results = await asyncio.gather(*plays, return_exceptions=True)  # every member ends before an error propagates
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    return list(results)


class GroupRequests:
    """Where a group's members ask for their next completion: equal prompts become one ``n = k`` request.

    A turn's requests go out once every member still playing has asked or finished (members
    wait for each other at each turn), each distinct prompt (token ids and image slots) as one
    request whose ``k`` completions are dealt to its askers in order. Independent draws from
    one distribution: the same as ``k`` requests of ``n = 1``, for one HTTP call and one prefill.
    """

    def __init__(self, size: int, client: TrainClient, sampling: Sampling, limit: AbstractAsyncContextManager,
                 group_id: str | None = None) -> None:
        self.playing, self.client, self.sampling, self.limit, self.group_id = size, client, sampling, limit, group_id
        self.asked: dict[tuple, list[tuple[Any, asyncio.Future]]] = {}
        self.sent: set[asyncio.Task] = set()

    async def generate(self, rendered: Any) -> tuple[Completion, int]:
        """This member's completion of ``rendered`` and the weight version that sampled it."""
        future = asyncio.get_running_loop().create_future()
        key = (tuple(rendered.token_ids), tuple((s.offset, s.ref.encode()) for s in rendered.images))
        self.asked.setdefault(key, []).append((rendered, future))
        self._flush_when_all_asked()
        return await future

    def leave(self) -> None:
        """A member finished (done, or failed): the others no longer wait for it."""
        self.playing -= 1
        self._flush_when_all_asked()

    def _flush_when_all_asked(self) -> None:
        if not self.asked or sum(map(len, self.asked.values())) < self.playing:
            return
        asked, self.asked = self.asked, {}
        for askers in asked.values():
            task = asyncio.ensure_future(self._send(askers))
            self.sent.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self.sent.discard)

    async def _send(self, askers: list[tuple[Any, asyncio.Future]]) -> None:
        rendered, n = askers[0][0], len(askers)
        try:
            async with self.limit:
                result = await self.client.generate(rendered, dataclasses.replace(self.sampling, n=n))
            if len(result.completions) != n:
                raise InferenceServerError(f"asked for n={n} completions of group {self.group_id!r}'s shared prompt, "
                                           f"got {len(result.completions)}")
        except BaseException as exc:  # every asker gets the error
            for _, future in askers:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), completion in zip(askers, result.completions):
            if not future.done():
                future.set_result((completion, result.weight_version))


async def run_rollouts(envs: Sequence[Environment], renderer: Any, client: TrainClient, store: ImageStore,
                       sampling: Sampling, concurrency: int = 64, group_ids: Sequence[str | None] | None = None,
                       max_turns: int = 32) -> list[Trace]:
    """Run many rollouts concurrently, at most ``concurrency`` at a time, results in input order."""
    limit = asyncio.Semaphore(concurrency)
    groups = list(group_ids) if group_ids is not None else [None] * len(envs)

    async def one(env: Environment, group: str | None) -> Trace:
        async with limit:
            return await run_rollout(env, renderer, client, store, sampling, max_turns, group)

    return list(await asyncio.gather(*(one(e, g) for e, g in zip(envs, groups))))


async def run_group_rollouts(groups: Sequence[Sequence[Environment] | ResetCopies], renderer: Any, client: TrainClient,
                             store: ImageStore, sampling: Sampling, concurrency: int = 64,
                             group_ids: Sequence[str | None] | None = None, max_turns: int = 32,
                             clock: RolloutClock | None = None) -> list[list[Trace]]:
    """``run_group_rollout`` for every group concurrently, at most ``concurrency`` requests in flight."""
    limit = asyncio.Semaphore(concurrency)
    ids = list(group_ids) if group_ids is not None else [None] * len(groups)
    return list(await asyncio.gather(*(run_group_rollout(envs, renderer, client, store, sampling, max_turns, gid, limit,
                                                         clock) for envs, gid in zip(groups, ids))))


@dataclasses.dataclass(frozen=True)
class DroppedGroup:
    """A group that was not played to the end because its environment failed."""

    group_id: str | None
    size: int        # rollouts lost with it
    error: Exception  # EnvFailedError (its __cause__ is the environment's error) or ImageInputError


@dataclasses.dataclass(frozen=True)
class GroupBatch:
    """What ``play_groups`` returns: the groups played, in input order, and the ones dropped."""

    groups: list[list[Trace]]
    dropped: list[DroppedGroup]

    @property
    def traces(self) -> list[Trace]:
        return [trace for group in self.groups for trace in group]

    @property
    def rollouts_dropped(self) -> int:
        return sum(d.size for d in self.dropped)


async def play_groups(groups: Sequence[Sequence[Environment] | ResetCopies], renderer: Any, client: TrainClient,
                      store: ImageStore, sampling: Sampling, concurrency: int = 64,
                      group_ids: Sequence[str | None] | None = None, max_turns: int = 32,
                      clock: RolloutClock | None = None) -> GroupBatch:
    """``run_group_rollouts`` that drops a group whose environment failed, instead of raising.

    A failure is an environment that raised (``EnvFailedError``) or images it sent that cannot
    become refs (``ImageInputError``); errors of the server or the client itself still raise.
    """
    limit = asyncio.Semaphore(concurrency)
    ids = list(group_ids) if group_ids is not None else [None] * len(groups)

    async def one(envs: Sequence[Environment] | ResetCopies, gid: str | None) -> list[Trace] | DroppedGroup:
        try:
            return await run_group_rollout(envs, renderer, client, store, sampling, max_turns, gid, limit, clock)
        except (EnvFailedError, ImageInputError) as exc:
            return DroppedGroup(gid, envs.size if isinstance(envs, ResetCopies) else len(envs), exc)

    results = await asyncio.gather(*(one(envs, gid) for envs, gid in zip(groups, ids)))
    return GroupBatch([r for r in results if isinstance(r, list)], [r for r in results if isinstance(r, DroppedGroup)])


def _check_one_per_turn(sampling: Sampling) -> None:
    if sampling.n != 1:
        raise ValueError("a rollout samples one completion per turn (n=1); run a group as n rollouts "
                         "or as run_group_rollout")


async def _play(env: Environment, messages: list[dict[str, Any]], rendered: Any, requests: GroupRequests,
                renderer: Any, store: ImageStore, max_turns: int, group_id: str | None, clock: RolloutClock) -> Trace:
    """The turn loop from the opening ``messages`` (rendered), asking ``requests`` for each completion."""
    try:
        return await _turns(env, messages, rendered, requests, renderer, store, max_turns, group_id, clock)
    finally:
        requests.leave()
        await close_env(env)


async def _turns(env: Environment, messages: list[dict[str, Any]], rendered: Any, requests: GroupRequests,
                 renderer: Any, store: ImageStore, max_turns: int, group_id: str | None, clock: RolloutClock) -> Trace:
    nodes, turn_rewards, metrics = [], [], {"bridged_turns": 0.0, "full_renders": 1.0}
    for turn in range(max_turns):
        completion, weight_version = await requests.generate(rendered)
        nodes.append(TraceNode(prompt_ids=rendered.token_ids, completion_ids=completion.token_ids,
                               completion_logprobs=completion.logprobs, images=rendered.images,
                               num_messages=len(messages), finish_reason=completion.finish_reason,
                               weight_version=weight_version, temperature=requests.sampling.temperature))
        with clock.timing("render_s"):
            parsed = renderer.parse_response(completion.token_ids)
        with clock.timing("env_s"):
            new_messages, reward, done = await step_env(env, parsed)
        turn_rewards.append(float(reward))
        messages = messages + [{"role": "assistant", "content": parsed.content}]
        if done:
            break
        with clock.timing("render_s"):
            new_messages, _ = prepare_images(new_messages, store, renderer.spec, image_root_of(env))
            bridged = renderer.bridge_to_next_turn(rendered.token_ids, completion.token_ids, new_messages,
                                                   rendered.images, tools=tools_of(env), prev=rendered)
            messages = messages + new_messages
            if bridged is None:
                rendered = renderer.render(messages, tools=tools_of(env))
                metrics["full_renders"] += 1
            else:
                rendered = bridged
                metrics["bridged_turns"] += 1
    return Trace.build(rollout_id=uuid.uuid4().hex[:12], group_id=group_id, family=renderer.family,
                       image_pad_id=renderer.image_pad_id, stop_token_ids=renderer.stop_token_ids,
                       messages=messages, nodes=nodes, reward=turn_rewards[-1] if turn_rewards else 0.0,
                       turn_rewards=turn_rewards, metrics=metrics)
