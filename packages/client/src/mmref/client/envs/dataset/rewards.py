"""Reward functions of the dataset environment: built in, or ``module:function``, summed with weights.

A reward function takes the completion text and the row's answer (and ``row=``, the whole
row, if it names that parameter), plus its options, and returns a float::

    def score(completion: str, answer: str, row: dict) -> float: ...

    rewards = load_rewards(["exact", {"fn": "number", "tolerance": 0.5, "weight": 0.5}, "my_pkg.scoring:score"])
    total(rewards, "42", "42.3", row)          # 1.0 * exact + 0.5 * number + 1.0 * score

| built-in | right when                                                                       |
|----------|----------------------------------------------------------------------------------|
| exact    | the completion equals the answer (case, outer spaces and end punctuation ignored)|
| choice   | the first standalone option letter (``choices``, default "ABCD") is the answer   |
| number   | the last number in the completion is within ``tolerance`` (default 1e-6) of it   |
| regex    | ``pattern``'s first group (or match) equals the answer; without ``pattern``, the |
|          | completion fully matches the answer read as a regular expression                 |
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmref.client.environment import accepts_keyword
from mmref.client.errors import RewardFunctionError

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _normal(text: Any) -> str:
    return str(text).strip().strip(".!?,;:").strip().lower()


def exact(completion: str, answer: Any) -> float:
    """1.0 when the completion is the answer, ignoring case, outer spaces and end punctuation."""
    return float(_normal(completion) == _normal(answer))


def choice(completion: str, answer: Any, choices: str = "ABCD") -> float:
    """1.0 when the first standalone option letter in the completion is the answer's letter."""
    found = re.search(rf"\b([{re.escape(choices)}])\b", completion)
    return float(found is not None and found.group(1) == str(answer).strip().strip("()."))


def number(completion: str, answer: Any, tolerance: float = 1e-6) -> float:
    """1.0 when the last number in the completion is within ``tolerance`` of the answer."""
    found = _NUMBER.findall(completion)
    if not found:
        return 0.0
    return float(math.isclose(float(found[-1]), float(answer), rel_tol=0.0, abs_tol=tolerance))


def regex(completion: str, answer: Any, pattern: str | None = None) -> float:
    """``pattern``'s first group (or whole match) equals the answer; no pattern: the answer is the regex."""
    if pattern is None:
        return float(re.fullmatch(str(answer), completion.strip()) is not None)
    found = re.search(pattern, completion)
    if found is None:
        return 0.0
    return exact(found.group(1) if found.groups() else found.group(0), answer)


BUILTIN_REWARDS: Mapping[str, Callable[..., float]] = {"exact": exact, "choice": choice, "number": number,
                                                       "regex": regex}


@dataclass(frozen=True)
class Reward:
    """One reward function with its weight and options."""

    name: str
    fn: Callable[..., float]
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    takes_row: bool = False  # the function names a ``row`` parameter (or takes **kwargs)

    def __call__(self, completion: str, answer: Any, row: Mapping[str, Any], where: str) -> float:
        """The weighted score; ``where`` (e.g. "row 12") names the row in errors."""
        extra = {"row": row} if self.takes_row else {}
        try:
            value = self.fn(completion, answer, **extra, **self.options)
        except Exception as exc:  # noqa: BLE001 - user code: typed, named, and the rollout is dropped
            raise RewardFunctionError(f"reward function {self.name!r} raised {type(exc).__name__} on {where}: "
                                      f"{exc}") from exc
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardFunctionError(f"reward function {self.name!r} returned {value!r} on {where}; "
                                      "expected a finite number")
        return self.weight * float(value)


def load_rewards(specs: Sequence[str | Mapping[str, Any]]) -> tuple[Reward, ...]:
    """Rewards from specs: a name (built-in or ``module:function``) or ``{"fn": name, "weight": w, **options}``."""
    if not specs:
        raise RewardFunctionError("the dataset environment needs at least one reward function (e.g. rewards = "
                                  "['exact'])")
    return tuple(_load_one(spec) for spec in specs)


def total(rewards: Sequence[Reward], completion: str, answer: Any, row: Mapping[str, Any], where: str) -> float:
    """The weighted sum of every reward."""
    return sum(reward(completion, answer, row, where) for reward in rewards)


def _load_one(spec: str | Mapping[str, Any]) -> Reward:
    if isinstance(spec, str):
        spec = {"fn": spec}
    options = dict(spec)
    name = options.pop("fn", None)
    if not isinstance(name, str):
        raise RewardFunctionError(f"reward spec {dict(spec)!r} needs 'fn': a built-in "
                                  f"({', '.join(BUILTIN_REWARDS)}) or 'module:function'")
    weight = options.pop("weight", 1.0)
    fn = _resolve(name)
    return Reward(name, fn, float(weight), options, accepts_keyword(fn, "row"))


def _resolve(name: str) -> Callable[..., float]:
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RewardFunctionError(f"reward function {name!r} is no built-in ({', '.join(BUILTIN_REWARDS)}) "
                                  "and no import path 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise RewardFunctionError(f"reward function {name!r}: cannot import {module_name!r}: {exc}") from exc
    except AttributeError:
        raise RewardFunctionError(f"reward function {name!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(fn):
        raise RewardFunctionError(f"reward function {name!r} is a {type(fn).__name__}, not a function")
    return fn
