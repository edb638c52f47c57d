"""What a user sees after a run: the reward curve and a static HTML rollout viewer.

Both are written into the run directory and reference only files inside it: the viewer
shows images from the run's own store (``store/<asset>``) next to the completions.

    run/
      metrics.jsonl      one JSON object per step
      rollouts.jsonl     a few RolloutRecords per step
      reward.png         reward curve
      viewer.html        rollouts per step, images inline
      store/             the content-addressed images the refs name
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class TurnRecord:
    """One turn of a rollout as the viewer shows it."""

    user_text: str
    images: list[str]  # store-relative asset ids, in prompt order
    completion: str
    reward: float | None = None


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout of one step, for the viewer."""

    step: int
    rollout_id: str
    reward: float
    turns: list[TurnRecord] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> RolloutRecord:
        data = json.loads(line)
        return cls(**{**data, "turns": [TurnRecord(**t) for t in data["turns"]]})


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file (empty list if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_reward_curve(metrics: list[dict[str, Any]], path: Path, chance: float | None = None) -> Path:
    """Plot mean reward per step, eval reward (``evals`` in a step's metrics) and chance level to a PNG."""
    steps = [m["step"] for m in metrics]
    rewards = [m["reward_mean"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, rewards, marker="o", markersize=3, label="mean reward")
    evals = sorted((e["weight_version"], e["reward_mean"]) for m in metrics for e in m.get("evals", []))
    if evals:  # at x = steps trained: the weights the rollouts of that step sample from
        ax.plot(*zip(*evals), marker="s", markersize=4, label="eval reward")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.2f})")
    ax.set(xlabel="step", ylabel="reward", ylim=(-0.02, 1.02), title="mmref rl: reward per step")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_viewer(run_dir: Path, records: list[RolloutRecord], store_dir: str = "store") -> Path:
    """A self-contained HTML page of rollouts per step; images link into the run's store."""
    by_step: dict[int, list[RolloutRecord]] = {}
    for record in records:
        by_step.setdefault(record.step, []).append(record)
    sections = []
    for step in sorted(by_step):
        rows = "".join(_rollout_html(r, store_dir) for r in by_step[step])
        sections.append(f"<section id='step-{step}'><h2>step {step}</h2>{rows}</section>")
    page = (
        "<!doctype html><meta charset='utf-8'><title>mmref rollouts</title>"
        "<style>body{font:14px sans-serif;margin:2em}section{margin-bottom:2em}"
        ".rollout{border:1px solid #ccc;border-radius:6px;padding:.5em;margin:.5em 0}"
        ".turn{display:flex;gap:1em;align-items:center;margin:.3em 0}"
        "img{image-rendering:pixelated;width:96px;border:1px solid #999}"
        ".ok{color:#2a2}.bad{color:#c22}code{background:#f4f4f4;padding:0 .3em}</style>"
        "<h1>mmref rollouts</h1>" + "".join(sections)
    )
    path = run_dir / "viewer.html"
    path.write_text(page)
    return path


def _rollout_html(record: RolloutRecord, store_dir: str) -> str:
    turns = []
    for turn in record.turns:
        images = "".join(f"<img src='{store_dir}/{html.escape(a)}' alt='{html.escape(a)}'>" for a in turn.images)
        mark = "" if turn.reward is None else ("<span class='ok'>✓</span>" if turn.reward > 0 else "<span class='bad'>✗</span>")
        turns.append(f"<div class='turn'>{images}<div>{html.escape(turn.user_text)} → "
                     f"<code>{html.escape(turn.completion)}</code> {mark}</div></div>")
    return (f"<div class='rollout'><b>{html.escape(record.rollout_id)}</b> reward {record.reward:.2f}"
            f"{''.join(turns)}</div>")
