"""One episode of the dataset environment: a row's images and prompt, answered once or retried with feedback.

    env = DatasetEpisode(row, "row 7", task)
    messages = env.reset()              # [system?, user(images..., prompt)]
    new, reward, done = env.step("B")   # right: done; wrong: the feedback message until max_turns

The reward is the score of the last answer; a right answer after ``k`` wrong ones earns
``retry_discount ** k`` of it (1.0: retries cost nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmref.client.envs.dataset.rewards import Reward, total
from mmref.client.envs.dataset.rows import image_parts, open_image
from mmref.client.errors import DatasetError


@dataclass(frozen=True)
class Task:
    """What every episode of one dataset shares (built by ``DatasetSource`` from its config)."""

    prompt: str
    answer_column: str
    image_column: str | None
    rewards: tuple[Reward, ...]
    image_root: Path
    system_prompt: str | None = None
    max_turns: int = 1
    feedback: str = "That is not right. Try again."
    retry_discount: float = 0.5
    pass_score: float = 1.0
    blank_images: bool = False

    def prompt_text(self, row: dict[str, Any], where: str) -> str:
        """The prompt template filled with the row's fields."""
        try:
            return self.prompt.format(**row)
        except KeyError as exc:
            raise DatasetError(f"{where}: prompt template {self.prompt!r} names field {exc.args[0]!r}, which the "
                               f"row lacks (columns: {sorted(row)})") from None
        except (IndexError, ValueError) as exc:
            raise DatasetError(f"prompt template {self.prompt!r} is not a valid str.format template: {exc}") from None


class DatasetEpisode:
    """A row played as a conversation (state is per episode)."""

    def __init__(self, row: dict[str, Any], where: str, task: Task) -> None:
        self.row, self.where, self.task = row, where, task
        self.image_root = task.image_root  # relative image paths are read from here, by the client
        self.scores: list[float] = []

    def reset(self) -> list[dict[str, Any]]:
        task, self.scores = self.task, []
        content: list[dict[str, Any]] = []
        if task.image_column is not None:
            content = image_parts(self.row[task.image_column], task.image_column, self.where)
            if task.blank_images:
                content = [{"type": "image", "image": _blank(open_image(p["image"], task.image_root))} for p in content]
        content.append({"type": "text", "text": task.prompt_text(self.row, self.where)})
        system = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
        return system + [{"role": "user", "content": content}]

    def step(self, completion_text: str) -> tuple[list[dict[str, Any]], float, bool]:
        if len(self.scores) >= self.task.max_turns:
            raise RuntimeError("step() called after the episode ended; call reset() first")
        score = total(self.task.rewards, completion_text, self.row[self.task.answer_column], self.row, self.where)
        self.scores.append(score)
        done = score >= self.task.pass_score or len(self.scores) == self.task.max_turns
        feedback = [] if done else [{"role": "user", "content": self.task.feedback}]
        return feedback, self.reward, done

    def answer(self) -> str:
        """The row's answer: what ``mmref sft`` demonstrates."""
        return str(self.row[self.task.answer_column])

    @property
    def reward(self) -> float:
        """The last answer's score, discounted by the retries before it."""
        if not self.scores:
            return 0.0
        return self.scores[-1] * self.task.retry_discount ** (len(self.scores) - 1)


def _blank(image: Image.Image) -> Image.Image:
    """A grey image of the same size (the ablation: same tokens, no information)."""
    return Image.new("RGB", image.size, (128, 128, 128))
