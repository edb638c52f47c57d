"""The run's environment, from ``[env]``: what ``mmref rl`` and ``mmref sft`` play, loaded by name.

    source = run_environment(config)     # env.name + [env.args] (+ blank_images under --ablate-images)
    env = source.episode(seed)
    evals = eval_episodes(source, "eval", 32)
"""

from __future__ import annotations

from mmref.client.environment import Environment, EnvironmentSource, accepts_keyword
from mmref.client.envs.loader import load_environment, resolve_factory
from mmref.client.errors import EnvLoadError
from mmref.client.interception import SamplingOverride
from mmref.client.train_client import Sampling
from mmref.trainer.run_config import RunConfig


def run_environment(config: RunConfig) -> EnvironmentSource:
    """The source of the run's episodes; ``env.ablate_images`` asks the factory for ``blank_images=True``."""
    name, args = config.env.name, dict(config.env.args)
    factory = resolve_factory(name)
    if config.env.ablate_images:
        if not accepts_keyword(factory, "blank_images"):
            raise EnvLoadError(f"env {name!r} has no blank_images option, so env.ablate_images (--ablate-images) "
                               "cannot blank its images")
        args["blank_images"] = True
    return load_environment(name, args, seed=config.seed)


# Training draws episode seeds with randrange(2**31), so seeds from 2**31 up are never trained on.
EVAL_SEED_BASE = 2**31


def eval_episodes(source: EnvironmentSource, split: str, limit: int) -> list[Environment]:
    """Held-out episodes: the source's ``eval_episodes(limit, split)``, else seeds training never draws."""
    if callable(getattr(source, "eval_episodes", None)):
        return list(source.eval_episodes(limit, split=split))
    return [source.episode(EVAL_SEED_BASE + i) for i in range(limit)]


def run_sampling(config: RunConfig, evaluating: bool = False) -> Sampling:
    """The run's sampling: ``[rollout]``'s, or greedy-or-``eval.temperature`` with top_p 1 in evaluations."""
    cfg = config.rollout
    if evaluating:
        return Sampling(temperature=config.eval.temperature, max_tokens=cfg.max_tokens)
    return Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)


def agent_sampling(config: RunConfig, evaluating: bool = False) -> SamplingOverride | None:
    """What agents' calls get under ``rollout.agent_sampling``: the run's sampling ("run"), or their own ("agent")."""
    if config.rollout.agent_sampling == "agent":
        return None
    sampling = run_sampling(config, evaluating)
    return SamplingOverride(sampling.temperature, sampling.top_p, sampling.max_tokens)
