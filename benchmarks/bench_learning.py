"""Does the main job learn every time? ``mmref rl`` on a config over several seeds, plus blank-image runs.

    uv run python benchmarks/bench_learning.py                       # examples/color-codeword.toml, seeds 0-4
    uv run python benchmarks/bench_learning.py --seeds 0 1 --blank-seeds 0

Each run is the real command (``python -m mmref.trainer.cli rl``) in its own process, one
after another, with ``seed`` and ``model.seed`` set to the run's seed (a new model init and
new episodes). Per run: the mean reward of the last 5 steps, the lowest reward after the
first step at or above 0.85, the step and wall seconds at which the 5-step mean first
reaches 0.9, and the run's wall time. Writes ``docs/color-codeword-seeds.png`` (every
curve) and prints one JSON line. Targets: last-5 >= 0.9 and never below 0.7 after 0.85 for
every seed, each run <= 300 s; blank images <= chance + 0.1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 0.25  # 4 colours


def run(config: Path, seed: int, out: Path, blank: bool) -> dict:
    """One ``mmref rl`` run; its per-step rewards and timings."""
    command = [sys.executable, "-m", "mmref.trainer.cli", "rl", str(config), "--output-dir", str(out),
               "--set", f"seed={seed}", "--set", f"model.seed={seed}"] + (["--ablate-images"] if blank else [])
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward_mean"] for m in metrics]
    startup = wall - sum(m["step_s"] for m in metrics)  # process start, model build, trainer ranks
    crossed = next((i for i, r in enumerate(rewards) if r >= 0.85), None)
    to_09 = next((i for i in range(4, len(rewards)) if sum(rewards[i - 4:i + 1]) / 5 >= 0.9), None)
    return {
        "seed": seed, "blank": blank, "steps": len(rewards), "wall_s": round(wall, 1),
        "last5": round(sum(rewards[-5:]) / len(rewards[-5:]), 3),
        "min_after_crossing_085": round(min(rewards[crossed:]), 3) if crossed is not None else None,
        "step_to_0.9": to_09,
        "wall_s_to_0.9": round(startup + sum(m["step_s"] for m in metrics[:to_09 + 1]), 1) if to_09 is not None else None,
        "step_s_mean": round(sum(m["step_s"] for m in metrics) / len(metrics), 2),
        "rewards": [round(r, 3) for r in rewards],
    }


def plot(runs: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    for r in runs:
        style = dict(color="grey", linestyle=":") if r["blank"] else {}
        ax.plot(r["rewards"], label=f"{'blank, ' if r['blank'] else ''}seed {r['seed']}", linewidth=1.2, **style)
    ax.axhline(CHANCE, color="black", linestyle="--", linewidth=0.8, label=f"chance ({CHANCE})")
    ax.set(xlabel="step", ylabel="mean reward", ylim=(-0.02, 1.02), title="mmref rl examples/color-codeword.toml")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "color-codeword.toml")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--blank-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "color-codeword-seeds.png")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="mmref-bench-learning-") as tmp:
        for seed, blank in [(s, False) for s in args.seeds] + [(s, True) for s in args.blank_seeds]:
            runs.append(run(args.config, seed, Path(tmp) / f"{'blank' if blank else 'images'}-{seed}", blank))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "rewards"}), file=sys.stderr, flush=True)
    plot(runs, args.plot)
    learned = [r for r in runs if not r["blank"]]
    blank = [r for r in runs if r["blank"]]
    result = {
        "benchmark": "learning", "config": str(args.config.relative_to(ROOT)), "seeds": len(learned),
        "min_last5": min(r["last5"] for r in learned),
        "min_after_crossing_085": min((r["min_after_crossing_085"] for r in learned if r["min_after_crossing_085"] is not None), default=None),
        "max_wall_s": max(r["wall_s"] for r in learned),
        "max_blank_last5": max((r["last5"] for r in blank), default=None),
        "target_min_last5": 0.9, "target_min_after_crossing_085": 0.7, "target_max_wall_s": 300,
        "target_max_blank_last5": CHANCE + 0.1, "runs": runs,
    }
    result["ok"] = (result["min_last5"] >= 0.9 and (result["min_after_crossing_085"] or 0) >= 0.7
                    and result["max_wall_s"] <= 300 and (result["max_blank_last5"] or 0) <= CHANCE + 0.1)
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
