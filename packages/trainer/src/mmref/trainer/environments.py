"""The run's environment, from ``[env]``: what ``mmref rl`` and ``mmref sft`` play, loaded by name.

    source = run_environment(config)     # env.name + [env.args] (+ blank_images under --ablate-images)
    env = source.episode(seed)
"""

from __future__ import annotations

from mmref.client.environment import EnvironmentSource, accepts_keyword
from mmref.client.envs.loader import load_environment, resolve_factory
from mmref.client.errors import EnvLoadError
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
