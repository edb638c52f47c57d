"""``env.name`` to a run's episodes: a built-in name, an import path, or an entry point.

    source = load_environment("color-codeword", {"colors": 4}, seed=0)
    source = load_environment("my_pkg.tasks:make_env", {"level": 2}, seed=0)   # package.module:factory
    agent = load_environment("examples/zoom_agent.py:zoom_agent", {}, seed=0)  # a file: relative to the cwd
    source = load_environment("my-task", {}, seed=0)     # entry point "my-task" in group mmref.environments
    env = source.episode(seed=123)

The factory is called with ``[env.args]`` as keyword arguments (and ``seed=`` when it has a
parameter of that name). It returns either an ``EnvironmentSource`` (an object with ``episode(seed)``, used for
the whole run) or an environment (``reset``/``step``): then the factory is called again for
every episode, with that episode's seed. An ``async def`` factory, or a factory that returns an
object with ``run``, is an agent (``mmref.client.agent``): it plays against an OpenAI base_url.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmref.client.agent import Agent, FunctionAgent, is_agent, is_agent_function
from mmref.client.environment import Environment, EnvironmentSource, Vocabulary, accepts_keyword, vocabulary_of
from mmref.client.errors import EnvFailedError, EnvLoadError

ENTRY_POINT_GROUP = "mmref.environments"
BUILTINS: Mapping[str, str] = {
    "color-codeword": "mmref.client.envs.color_codeword:color_codeword",
    "dataset": "mmref.client.envs.dataset:dataset",
}


def load_environment(name: str, args: Mapping[str, Any] | None = None, seed: int = 0) -> EnvironmentSource | Agent:
    """The episodes of ``name`` built with ``args``; raises ``EnvLoadError`` naming what failed."""
    factory = resolve_factory(name)
    return build_source(name, factory, dict(args or {}), seed)


def resolve_factory(name: str) -> Callable[..., Any]:
    """The factory ``name`` points to: a built-in, ``package.module:attr``, or an entry point."""
    if name in BUILTINS:
        return _import(BUILTINS[name], name)
    if ":" in name:
        return _import(name, name)
    points = [p for p in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if p.name == name]
    if not points:
        raise EnvLoadError(f"env.name {name!r} is no built-in ({', '.join(sorted(BUILTINS))}), no import path "
                           f"'package.module:factory' and no entry point in group {ENTRY_POINT_GROUP!r}")
    try:
        factory = points[0].load()
    except Exception as exc:  # noqa: BLE001 - whatever importing the plug-in raised, named
        raise EnvLoadError(f"entry point {name!r} ({points[0].value}) failed to load: "
                           f"{type(exc).__name__}: {exc}") from exc
    return _callable(factory, name)


def build_source(name: str, factory: Callable[..., Any], args: dict[str, Any],
                 seed: int) -> EnvironmentSource | Agent:
    """Call ``factory`` once; a source or an agent is returned as is, an environment makes a ``FactorySource``.

    An ``async def`` factory is an agent function itself (``mmref.client.agent``): not called here.
    """
    if is_agent_function(factory):
        return FunctionAgent(name, factory, args)
    seeded = accepts_keyword(factory, "seed", named=True)
    try:
        made = factory(**args, **({"seed": seed} if seeded else {}))
    except Exception as exc:  # noqa: BLE001 - a broken factory or bad [env.args]: a load error naming both
        raise EnvLoadError(f"env factory {name!r} raised {type(exc).__name__}: {exc} "
                           f"(called with [env.args] {sorted(args)})") from exc
    if callable(getattr(made, "episode", None)):
        return made
    if callable(getattr(made, "reset", None)) and callable(getattr(made, "step", None)):
        return FactorySource(name, factory, args, seeded, made)
    if is_agent(made):
        return made
    raise EnvLoadError(f"env factory {name!r} returned {type(made).__name__}, which is neither an environment "
                       "(reset and step), a source of episodes (episode(seed)) nor an agent (async run)")


@dataclass(frozen=True)
class FactorySource:
    """Episodes from a factory that returns one environment per call; ``probe`` is its first product."""

    name: str
    factory: Callable[..., Environment]
    args: dict[str, Any]
    seeded: bool
    probe: Environment

    def episode(self, seed: int) -> Environment:
        try:
            return self.factory(**self.args, **({"seed": seed} if self.seeded else {}))
        except Exception as exc:  # noqa: BLE001 - fails this episode's group, not the run
            raise EnvFailedError(f"env factory {self.name!r} raised {type(exc).__name__} making an episode: "
                                 f"{exc}") from exc

    def vocabulary(self) -> Vocabulary | None:
        return vocabulary_of(self.probe)

    @property
    def chance(self) -> float | None:
        return getattr(self.probe, "chance", None)


def _import(target: str, name: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise EnvLoadError(f"env.name {name!r}: an import path looks like 'package.module:factory'")
    try:
        module = _load_file(module_name, name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except ImportError as exc:
        raise EnvLoadError(f"env.name {name!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EnvLoadError(f"env.name {name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _callable(obj, name)


def _load_file(path: str, name: str) -> Any:
    """The module of a Python file (``examples/zoom_agent.py``, relative to the working directory)."""
    file = Path(path)
    if not file.is_file():
        raise EnvLoadError(f"env.name {name!r}: no file {path} (a path is relative to the working directory)")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module  # dataclasses and pickling look their module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever the file raised on import, named
        sys.modules.pop(file.stem, None)
        raise EnvLoadError(f"env.name {name!r}: {path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _callable(obj: Any, name: str) -> Callable[..., Any]:
    if not callable(obj):
        raise EnvLoadError(f"env.name {name!r} names a {type(obj).__name__}, not a factory (a class or function)")
    return obj
