"""The dataset environment's episodes: rows split into train and eval, played in a seeded order.

    source = dataset(path="data/shapes.jsonl", prompt="{question}", rewards=["choice"], eval_fraction=0.1, seed=0)
    env = source.episode(seed)          # the next train row (the order is the source's; ``seed`` is unused)
    evals = source.eval_episodes()      # every eval row, in file order
    state = source.state_dict()         # the data position; load_state_dict(state) continues from it
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmref.client.environment import Vocabulary
from mmref.client.envs.dataset.episode import DatasetEpisode, Task
from mmref.client.envs.dataset.order import DataOrder
from mmref.client.envs.dataset.rewards import load_rewards
from mmref.client.envs.dataset.rows import read_rows
from mmref.client.errors import DatasetError

MAX_ANSWER_WORDS = 64  # more distinct answers than this are no closed answer set: no answer tokens
MAX_PROMPT_WORDS = 256  # prompt words as single tokens: a few hundred keep a tiny model's vocabulary tiny


@dataclass(frozen=True)
class DatasetConfig:
    """``[env.args]`` of ``env.name = "dataset"``.

    | field          | default    | meaning                                                             |
    |----------------|------------|---------------------------------------------------------------------|
    | path           | (required) | JSONL or Parquet file; image paths are relative to its directory    |
    | prompt         | "{question}" | ``str.format`` template over the row's fields                     |
    | answer_column  | "answer"   | what the rewards compare against                                    |
    | image_column   | "image"    | one image or a list per row ("" for text-only rows)                 |
    | system_prompt  | None       | a system message opening every episode                              |
    | rewards        | ["exact"]  | built-in names, "module:function", or {fn, weight, **options}       |
    | max_turns      | 1          | > 1: a wrong answer gets ``feedback`` and another try               |
    | feedback       | "That is not right. Try again." |                                                |
    | retry_discount | 0.5        | a right answer after k wrong ones earns retry_discount ** k         |
    | split_column   | None       | rows whose value is ``train_split`` train, ``eval_split`` evaluate  |
    | eval_fraction  | 0.0        | without a split column: this share of rows is held out for eval     |
    | split_seed     | 0          | the held-out draw (fixed, so every run seed evaluates the same rows)|
    | shuffle        | True       | shuffle the train rows every epoch with the run seed                |
    | epochs         | None       | how many passes over the train rows (None: endless)                 |
    | blank_images   | False      | ablation: every image replaced by a grey one of the same size       |
    """

    path: str
    prompt: str = "{question}"
    answer_column: str = "answer"
    image_column: str = "image"
    system_prompt: str | None = None
    rewards: Sequence[str | Mapping[str, Any]] = ("exact",)
    max_turns: int = 1
    feedback: str = "That is not right. Try again."
    retry_discount: float = 0.5
    split_column: str | None = None
    train_split: str = "train"
    eval_split: str = "eval"
    eval_fraction: float = 0.0
    split_seed: int = 0
    shuffle: bool = True
    epochs: int | None = None
    blank_images: bool = False

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or unset, got {self.epochs}")


@dataclass
class DatasetSource:
    """Train episodes in a seeded order, eval episodes on demand, and the data position."""

    config: DatasetConfig
    seed: int = 0
    rows: list[dict[str, Any]] = field(init=False)
    train: list[int] = field(init=False)
    eval: list[int] = field(init=False)
    task: Task = field(init=False)
    order: DataOrder = field(init=False)

    def __post_init__(self) -> None:
        cfg, path = self.config, Path(self.config.path)
        self.rows = read_rows(path)
        rewards = load_rewards(cfg.rewards)
        self.task = Task(prompt=cfg.prompt, answer_column=cfg.answer_column, image_column=cfg.image_column or None,
                         rewards=rewards, image_root=path.resolve().parent, system_prompt=cfg.system_prompt,
                         max_turns=cfg.max_turns, feedback=cfg.feedback, retry_discount=cfg.retry_discount,
                         pass_score=sum(r.weight for r in rewards if r.weight > 0), blank_images=cfg.blank_images)
        self._check_columns(path)
        self.train, self.eval = self._split(path)
        self.order = DataOrder(len(self.train), seed=self.seed, shuffle=cfg.shuffle, epochs=cfg.epochs)

    def episode(self, seed: int) -> DatasetEpisode:
        """The next train row's episode."""
        return self._episode(self.train[self.order.next()])

    def eval_episodes(self, limit: int | None = None, split: str = "eval") -> list[DatasetEpisode]:
        """The first ``limit`` rows of the ``eval`` (held-out) or ``train`` split, in file order, as episodes."""
        if split not in ("eval", "train"):
            raise DatasetError(f"split must be 'eval' or 'train', got {split!r}")
        rows = self.eval if split == "eval" else self.train
        if not rows:
            raise DatasetError(f"{self.config.path} holds no eval rows; set env.args.split_column or eval_fraction")
        return [self._episode(i) for i in rows[:limit]]

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state)

    def vocabulary(self) -> Vocabulary:
        """The distinct answers as words (a small set of single words), the prompts' words, and their characters."""
        task = self.task
        answers = list(dict.fromkeys(str(row[task.answer_column]).strip() for row in self.rows))
        closed = len(answers) <= MAX_ANSWER_WORDS and all(a and not re.search(r"\s", a) for a in answers)
        fixed = " ".join(filter(None, [re.sub(r"\{[^}]*\}", " ", task.prompt), task.system_prompt or "",
                                       task.feedback if task.max_turns > 1 else ""]))
        texts = list(dict.fromkeys(task.prompt_text(row, f"row {i}") for i, row in enumerate(self.rows)))
        words = list(dict.fromkeys(w for w in re.findall(r"\w+", " ".join([fixed, *texts])) if len(w) > 1))
        if len(words) > MAX_PROMPT_WORDS:  # open-ended prompts: only the template's own words
            words = list(dict.fromkeys(w for w in re.findall(r"\w+", fixed) if len(w) > 1))
        return Vocabulary(words=tuple(answers) if closed else (), prompt_words=tuple(words),
                          text="".join(sorted(set("".join(texts) + fixed))))

    def _episode(self, index: int) -> DatasetEpisode:
        return DatasetEpisode(self.rows[index], f"row {index} of {self.config.path}", self.task)

    def _check_columns(self, path: Path) -> None:
        task = self.task
        needed = [c for c in (task.answer_column, task.image_column, self.config.split_column) if c]
        for index, row in enumerate(self.rows):
            for column in needed:
                if column not in row:
                    raise DatasetError(f"row {index} of {path} has no column {column!r} (columns: {sorted(row)}); "
                                       "set env.args.answer_column / image_column / split_column to the right names")
            task.prompt_text(row, f"row {index} of {path}")

    def _split(self, path: Path) -> tuple[list[int], list[int]]:
        cfg, every = self.config, list(range(len(self.rows)))
        if cfg.split_column:
            train = [i for i in every if self.rows[i][cfg.split_column] == cfg.train_split]
            held = [i for i in every if self.rows[i][cfg.split_column] == cfg.eval_split]
        else:
            drawn = list(every)
            random.Random(f"mmref-split:{cfg.split_seed}").shuffle(drawn)
            held = sorted(drawn[: round(len(every) * cfg.eval_fraction)])
            train = sorted(set(every) - set(held))
        if not train:
            raise DatasetError(f"{path} leaves no train rows (split_column={cfg.split_column!r}, "
                               f"train_split={cfg.train_split!r}, eval_fraction={cfg.eval_fraction})")
        return train, held


def dataset(seed: int = 0, **options: Any) -> DatasetSource:
    """The ``dataset`` built-in: ``options`` are ``DatasetConfig`` fields, ``seed`` the run's."""
    return DatasetSource(DatasetConfig(**options), seed=seed)
