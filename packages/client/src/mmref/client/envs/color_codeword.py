"""``color-codeword``: a multi-turn task that can only be solved by looking at the images.

Each turn shows one generated image: a shape (circle, square or triangle) of one colour on
a noisy grey background, at a random size and position; the image itself also has a random
size, so layouts differ from turn to turn. The model must answer that turn's codeword, the
colour's word. Earlier turns' images stay in the conversation (bridged, never re-sent).
The reward is the fraction of turns answered right; with ``blank_images=True`` every image
is replaced by a blank one of the same size, so the best policy falls to chance.

    >>> env = ColorCodewordEnv(ColorCodewordConfig(turns=2), seed=3)
    >>> messages = env.reset()                  # [system, user(image + question)]
    >>> new, reward, done = env.step("red")     # next user turn, running reward, done flag

As a plug-in (``env.name = "color-codeword"``, ``[env.args]`` are ``ColorCodewordConfig``'s
fields): ``color_codeword(**args)`` is the source of a run's episodes, one per seed.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from mmref.client.environment import Vocabulary

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 50, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SYSTEM_PROMPT = "Answer with the colour word of the shape in the image."
QUESTION = "codeword?"


@dataclass(frozen=True)
class ColorCodewordConfig:
    """Task parameters.

    | field           | default | meaning                                                |
    |-----------------|---------|--------------------------------------------------------|
    | colors          | 4       | how many colours (and codewords) are in play           |
    | turns           | 2       | images (and answers) per episode                       |
    | min_side        | 40      | smallest image side in pixels                          |
    | max_side        | 96      | largest image side in pixels                           |
    | blank_images    | False   | ablation: same-size blank images (chance-level task)   |
    | system_prompt   | True    | open with the instruction (False: image + question only) |
    """

    colors: int = 4
    turns: int = 2
    min_side: int = 40
    max_side: int = 96
    blank_images: bool = False
    system_prompt: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.colors <= len(COLORS):
            raise ValueError(f"colors must be in [2, {len(COLORS)}], got {self.colors}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError(f"need 8 <= min_side <= max_side, got {self.min_side}, {self.max_side}")

    @property
    def words(self) -> tuple[str, ...]:
        """The codewords in play (the first ``colors`` colour names)."""
        return tuple(COLORS)[: self.colors]

    @property
    def chance(self) -> float:
        """Expected reward of a policy that cannot see the images."""
        return 1.0 / self.colors


def draw_shape_image(rng: random.Random, color: str, width: int, height: int, blank: bool = False) -> Image.Image:
    """A ``width`` x ``height`` image with one shape of ``color`` on noisy grey (or blank grey)."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    if blank:
        return image
    draw = ImageDraw.Draw(image)
    for _ in range(width * height // 64):  # sparse grey noise so images differ byte-wise
        x, y, g = rng.randrange(width), rng.randrange(height), rng.randint(100, 156)
        draw.point((x, y), fill=(g, g, g))
    side = min(width, height)
    r = rng.randint(max(3, side * 3 // 8), max(4, side // 2 - 1))  # large: colour dominates the image
    cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    shape = rng.choice(SHAPES)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return image


def png_data_url(image: Image.Image) -> str:
    """PNG data URL of an image (how environments hand images to the client)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def score_answer(text: str, word: str) -> float:
    """1.0 when the answer's first word is the codeword (case and punctuation ignored)."""
    tokens = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return float(bool(tokens) and tokens[0] == word)


@dataclass
class ColorCodewordEnv:
    """One episode of the color-codeword task (state is per episode; make one per rollout)."""

    config: ColorCodewordConfig = field(default_factory=ColorCodewordConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._answers: list[float] = []
        self.targets: list[str] = []

    def reset(self) -> list[dict[str, Any]]:
        """The opening messages: the system prompt (unless disabled) and the first image with its question."""
        self._answers, self.targets = [], []
        opening = [{"role": "system", "content": SYSTEM_PROMPT}] if self.config.system_prompt else []
        return opening + [self._turn_message()]

    def step(self, completion_text: str) -> tuple[list[dict[str, Any]], float, bool]:
        """Score the answer to the current turn; return the next user turn, reward so far, done."""
        if len(self._answers) >= len(self.targets):
            raise RuntimeError("step() called after the episode ended; call reset() first")
        self._answers.append(score_answer(completion_text, self.targets[-1]))
        done = len(self._answers) == self.config.turns
        return ([] if done else [self._turn_message()]), self.reward, done

    def answer(self) -> str:
        """The right reply to the current turn (its codeword): what ``mmref sft`` demonstrates."""
        return self.targets[-1]

    @property
    def reward(self) -> float:
        """Fraction of all turns answered right so far (unanswered turns count as wrong)."""
        return sum(self._answers) / self.config.turns

    def _turn_message(self) -> dict[str, Any]:
        color = self._rng.choice(self.config.words)
        width = self._rng.randint(self.config.min_side, self.config.max_side)
        height = self._rng.randint(self.config.min_side, self.config.max_side)
        self.targets.append(color)
        image = draw_shape_image(self._rng, color, width, height, blank=self.config.blank_images)
        return {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
            {"type": "text", "text": QUESTION},
        ]}


@dataclass(frozen=True)
class ColorCodewordSource:
    """The episodes of a run: ``episode(seed)`` plays what ``ColorCodewordEnv(config, seed)`` plays."""

    config: ColorCodewordConfig

    def episode(self, seed: int) -> ColorCodewordEnv:
        return ColorCodewordEnv(self.config, seed=seed)

    def vocabulary(self) -> Vocabulary:
        """The codewords as answer tokens, the question word, and the prompt's characters."""
        return Vocabulary(words=self.config.words, prompt_words=(QUESTION.rstrip("?"),), text=SYSTEM_PROMPT + QUESTION)

    @property
    def chance(self) -> float:
        return self.config.chance


def color_codeword(**options: Any) -> ColorCodewordSource:
    """The ``color-codeword`` built-in: ``options`` are ``ColorCodewordConfig`` fields."""
    return ColorCodewordSource(ColorCodewordConfig(**options))
