"""Write a small multi-image dataset for ``env.name = "dataset"``: a JSONL file and its PNGs.

Every row shows two images, A and B, and asks one of two questions:

    colour  "What colour is the shape in image B?"          answer: the colour word (4 colours)
    count   "Which image has more shapes, A or B?"          answer: A or B

    uv run python examples/make_shapes_dataset.py runs/shapes-data            # 2000 train + 200 eval rows
    uv run python examples/make_shapes_dataset.py runs/shapes-data --tasks count --rows 500
    uv run mmref rl examples/shapes-dataset.toml

Rows: {"images": ["images/00012-a.png", "images/00012-b.png"], "question": ..., "answer": ...,
"task": "colour", "split": "train"}; image paths are relative to the JSONL file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mmref.client.envs.color_codeword import COLORS, draw_shape_image

QUESTIONS = {"colour": "What colour is the shape in image B?", "count": "Which image has more shapes, A or B?"}


def shapes_image(rng: random.Random, count: int, side: int) -> Image.Image:
    """``count`` small white squares on grey, in distinct cells of a 3 x 3 grid."""
    image = Image.new("RGB", (side, side), (128, 128, 128))
    draw, cell = ImageDraw.Draw(image), side // 3
    for index in rng.sample(range(9), count):
        x, y = (index % 3) * cell, (index // 3) * cell
        r = rng.randint(cell // 4, cell // 2 - 1)
        cx, cy = x + cell // 2, y + cell // 2
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=(250, 250, 250))
    return image


def make_row(rng: random.Random, task: str, side: tuple[int, int], colors: tuple[str, ...]) -> tuple[list, str]:
    """Images A and B and the answer of one question."""
    if task == "colour":
        first, second = rng.sample(colors, 2)
        images = [draw_shape_image(rng, c, rng.randint(*side), rng.randint(*side)) for c in (first, second)]
        return images, second
    counts = rng.sample(range(1, 6), 2)
    images = [shapes_image(rng, n, rng.randint(*side)) for n in counts]
    return images, "A" if counts[0] > counts[1] else "B"


def write_dataset(out: Path, rows: int, eval_rows: int, tasks: list[str], seed: int = 0,
                  side: tuple[int, int] = (40, 64), colors: int = 4) -> Path:
    """Write ``out/data.jsonl`` and ``out/images/``; returns the JSONL path."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    palette = tuple(COLORS)[:colors]
    with (out / "data.jsonl").open("w") as f:
        for index in range(rows + eval_rows):
            task = tasks[index % len(tasks)]
            images, answer = make_row(rng, task, side, palette)
            names = []
            for label, image in zip("ab", images):
                name = f"images/{index:05d}-{label}.png"
                image.save(out / name)
                names.append(name)
            f.write(json.dumps({"images": names, "question": QUESTIONS[task], "answer": answer, "task": task,
                                "split": "train" if index < rows else "eval"}) + "\n")
    return out / "data.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for data.jsonl and images/")
    parser.add_argument("--rows", type=int, default=2000, help="train rows")
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--tasks", nargs="+", choices=sorted(QUESTIONS), default=["colour"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = write_dataset(args.out, args.rows, args.eval_rows, args.tasks, args.seed)
    print(f"wrote {args.rows} train + {args.eval_rows} eval rows to {path}")


if __name__ == "__main__":
    main()
