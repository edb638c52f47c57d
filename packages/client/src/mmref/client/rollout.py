"""Multi-turn rollouts: an environment, the renderer, the inference server, and a trace.

Each turn is rendered by bridging (the previous prompt and completion verbatim, then the
environment's new messages), falling back to a full render when the bridge returns None.
Images from the environment become store refs first (``prepare_images``).

    trace = await run_rollout(env, renderer, client, store, sampling)
    traces = await run_rollouts(envs, renderer, client, store, sampling, concurrency=64)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from mmref.client.images import prepare_images
from mmref.client.trace import Trace, TraceNode
from mmref.client.train_client import Sampling, TrainClient
from mmref.renderers.store import ImageStore


class Environment(Protocol):
    """A multi-turn task. Messages are OpenAI-style; images may be data URLs or PIL images."""

    def reset(self) -> list[dict[str, Any]]:
        """The opening messages."""

    def step(self, completion_text: str) -> tuple[list[dict[str, Any]], float, bool]:
        """React to the model's answer: (new messages, reward so far, done)."""


async def run_rollout(env: Environment, renderer: Any, client: TrainClient, store: ImageStore, sampling: Sampling,
                      max_turns: int = 32, group_id: str | None = None) -> Trace:
    """Play one episode; every model call becomes a trace node."""
    if sampling.n != 1:
        raise ValueError("a rollout samples one completion per turn (n=1); run a group as n rollouts")
    messages, _ = prepare_images(env.reset(), store, renderer.spec)
    rendered = renderer.render(messages)
    nodes, reward, metrics = [], 0.0, {"bridged_turns": 0.0, "full_renders": 1.0}
    for _ in range(max_turns):
        result = await client.generate(rendered, sampling)
        completion = result.completions[0]
        nodes.append(TraceNode(prompt_ids=rendered.token_ids, completion_ids=completion.token_ids,
                               completion_logprobs=completion.logprobs, images=rendered.images,
                               num_messages=len(messages), finish_reason=completion.finish_reason,
                               weight_version=result.weight_version, temperature=sampling.temperature))
        parsed = renderer.parse_response(completion.token_ids)
        new_messages, reward, done = env.step(parsed.content)
        messages = messages + [{"role": "assistant", "content": parsed.content}]
        if done:
            break
        new_messages, _ = prepare_images(new_messages, store, renderer.spec)
        bridged = renderer.bridge_to_next_turn(rendered.token_ids, completion.token_ids, new_messages, rendered.images,
                                               prev=rendered)
        messages = messages + new_messages
        if bridged is None:
            rendered = renderer.render(messages)
            metrics["full_renders"] += 1
        else:
            rendered = bridged
            metrics["bridged_turns"] += 1
    return Trace.build(rollout_id=uuid.uuid4().hex[:12], group_id=group_id, family=renderer.family,
                       image_pad_id=renderer.image_pad_id, stop_token_ids=renderer.stop_token_ids,
                       messages=messages, nodes=nodes, reward=reward, metrics=metrics)


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
