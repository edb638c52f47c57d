"""Evaluation: held-out episodes of the run's environment, each played once at the eval temperature.

    result = await evaluate(source, config, renderer, client, store, weight_version=12)
    result.reward_mean, result.as_dict()      # {"weight_version": 12, "reward_mean": ..., "rollouts": ...}

Temperature 0 is greedy: the same weights give the same completions. Episodes whose
environment fails are dropped and counted, as in training; if all fail, ``EnvFailedError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmref.client.agent import Agent, AgentHost, play_agent_groups
from mmref.client.environment import EnvironmentSource
from mmref.client.errors import EnvFailedError
from mmref.client.rollout import play_groups
from mmref.client.trace import Trace
from mmref.client.train_client import TrainClient
from mmref.renderers.store import ImageStore
from mmref.trainer.environments import EVAL_SEED_BASE, agent_sampling, eval_episodes, run_sampling
from mmref.trainer.run_config import RunConfig


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of the weights of ``weight_version`` (the number of steps trained)."""

    weight_version: int
    reward_mean: float
    rollouts: int
    rollouts_dropped: int
    temperature: float
    traces: list[Trace]

    def as_dict(self) -> dict[str, Any]:
        """What ``metrics.jsonl`` records (no traces)."""
        return {"weight_version": self.weight_version, "reward_mean": self.reward_mean, "rollouts": self.rollouts,
                "rollouts_dropped": self.rollouts_dropped, "temperature": self.temperature}


async def evaluate(source: EnvironmentSource | Agent, config: RunConfig, renderer: Any, client: TrainClient,
                   store: ImageStore, weight_version: int, agents: AgentHost | None = None) -> EvalResult:
    """Play ``config.eval.num_examples`` held-out episodes of ``config.eval.split`` once each.

    An agent (served by ``agents``) plays seeds training never draws, sampling as ``rollout.agent_sampling`` says.
    """
    cfg = config.eval
    ids = [f"eval-v{weight_version}-{i}" for i in range(cfg.num_examples)]
    if agents is not None:
        seeds = [EVAL_SEED_BASE + i for i in range(cfg.num_examples)]
        batch = await play_agent_groups(source, seeds, ids, 1, agents, config.rollout.concurrency,
                                        agent_sampling(config, evaluating=True))
    else:
        envs = eval_episodes(source, cfg.split, cfg.num_examples)
        batch = await play_groups([[env] for env in envs], renderer, client, store, run_sampling(config, True),
                                  concurrency=config.rollout.concurrency, group_ids=ids[:len(envs)])
    if not batch.groups:
        raise EnvFailedError(f"evaluation of weight version {weight_version}: all {len(batch.dropped)} episodes "
                             f"failed in the environment; the first error: {batch.dropped[0].error}")
    rewards = [t.reward for t in batch.traces]
    return EvalResult(weight_version, sum(rewards) / len(rewards), len(rewards), batch.rollouts_dropped,
                      cfg.temperature, batch.traces)
