"""Loading environments by name: built-ins, import paths, entry points, and typed errors naming what failed."""

import asyncio
import importlib.metadata
import sys
import textwrap

import pytest

from mmref.client.envs.color_codeword import ColorCodewordConfig, ColorCodewordEnv
from mmref.client.envs.loader import ENTRY_POINT_GROUP, load_environment
from mmref.client.errors import EnvFailedError, EnvLoadError

TOY = '''
class Toy:
    def __init__(self, seed=0, word="hi"):
        self.seed, self.word = seed, word
    def reset(self):
        return [{"role": "user", "content": f"{self.word} {self.seed}"}]
    def step(self, text):
        return [], float(text == self.word), True

def make(seed, word="hi"):
    if word == "boom-later" and seed != 0:
        raise RuntimeError("episode factory broke")
    return Toy(seed, word)

class Source:
    def __init__(self, level):
        self.level = level
    def episode(self, seed):
        return Toy(seed, f"level{self.level}")

def broken(**args):
    raise RuntimeError("no such dataset")

def not_an_env():
    return 42

VALUE = 3
'''


@pytest.fixture
def toymod(tmp_path, monkeypatch):
    """A module ``toy_env_mod`` importable from a temp dir (what a user's package is to the loader)."""
    (tmp_path / "toy_env_mod.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toy_env_mod"
    sys.modules.pop("toy_env_mod", None)


def test_an_import_path_factory_makes_one_environment_per_episode_with_its_seed_and_args(toymod):
    source = load_environment(f"{toymod}:make", {"word": "yo"}, seed=5)
    assert [source.episode(s).reset()[0]["content"] for s in (1, 2)] == ["yo 1", "yo 2"]


def test_a_factory_returning_a_source_is_used_as_the_source(toymod):
    source = load_environment(f"{toymod}:Source", {"level": 2})
    assert type(source).__name__ == "Source" and source.episode(7).reset()[0]["content"] == "level2 7"


def test_an_entry_point_in_the_mmref_environments_group_loads(toymod, monkeypatch):
    point = importlib.metadata.EntryPoint(name="toy", value=f"{toymod}:make", group=ENTRY_POINT_GROUP)
    asked = []

    def entry_points(group):
        asked.append(group)
        return [point] if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert load_environment("toy", seed=3).episode(4).reset()[0]["content"] == "hi 4"
    assert asked == [ENTRY_POINT_GROUP]


def test_the_color_codeword_builtin_plays_what_the_env_class_plays_per_seed():
    source = load_environment("color-codeword", {"colors": 3, "turns": 1})
    assert source.episode(11).reset() == ColorCodewordEnv(ColorCodewordConfig(colors=3, turns=1), seed=11).reset()


def test_a_factory_that_raises_is_a_load_error_naming_the_factory_and_its_error(toymod):
    with pytest.raises(EnvLoadError, match=rf"{toymod}:broken.*RuntimeError: no such dataset"):
        load_environment(f"{toymod}:broken", {"path": "x"})


def test_bad_env_args_are_a_load_error_naming_the_args():
    with pytest.raises(EnvLoadError, match=r"'color-codeword'.*colours.*\[env.args\] \['colours'\]"):
        load_environment("color-codeword", {"colours": 4})


@pytest.mark.parametrize("name, match", [
    ("no-such-env", r"no built-in \(color-codeword, dataset\).*entry point"),
    ("no_such_module_xyz:make", r"cannot import module 'no_such_module_xyz'"),
    ("{mod}:missing", r"has no attribute 'missing'"),
    ("{mod}:VALUE", r"names a int, not a factory"),
    ("{mod}:not_an_env", r"returned int, which is neither an environment"),
])
def test_names_that_yield_no_environment_are_load_errors_saying_why(toymod, monkeypatch, name, match):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(EnvLoadError, match=match):
        load_environment(name.format(mod=toymod))


def test_a_factory_failing_for_one_episode_fails_that_episode_only(toymod):
    source = load_environment(f"{toymod}:make", {"word": "boom-later"}, seed=0)
    with pytest.raises(EnvFailedError, match="episode factory broke"):
        source.episode(1)


AGENTS = '''
from mmref.client.environment import Vocabulary

async def solve(base_url, model, seed, bonus=0.0):
    return 1.0 + bonus
solve.vocabulary = Vocabulary(words=("yes",))

class Solver:
    def __init__(self, level, seed):
        self.level, self.seed = level, seed
    async def run(self, base_url, model, seed):
        return float(self.level)
'''


def test_an_async_function_or_an_object_with_run_loads_as_an_agent(tmp_path):
    from mmref.client.agent import FunctionAgent, is_agent
    from mmref.client.environment import vocabulary_of

    path = tmp_path / "agents_file.py"
    path.write_text(AGENTS)
    agent = load_environment(f"{path}:solve", {"bonus": 0.5})
    assert isinstance(agent, FunctionAgent) and is_agent(agent)
    assert asyncio.run(agent.run("http://x/v1", "m", 3)) == 1.5
    assert vocabulary_of(agent).words == ("yes",) and agent.chance is None  # read from the function
    solver = load_environment(f"{path}:Solver", {"level": 2}, seed=7)
    assert is_agent(solver) and (solver.level, solver.seed) == (2, 7)
    assert not is_agent(load_environment("color-codeword"))
    sys.modules.pop("agents_file", None)


@pytest.mark.parametrize("source,match", [(None, "no file"), ("raise KeyError('x')", "failed to import: KeyError")])
def test_a_python_file_that_is_missing_or_raises_is_a_load_error(tmp_path, source, match):
    path = tmp_path / "broken_file.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(EnvLoadError, match=match):
        load_environment(f"{path}:make")
