"""The proof that refs carry the images end to end: a random tiny model learns the main job, the
multi-turn task it can only solve by looking (the second image bridged into the first turn's
conversation), and the same run on blank images stays at chance (CPU, each run <= 5 minutes)."""

import io
import time
from pathlib import Path

import pytest
from rich.console import Console

from mmref.trainer.rl import run_rl
from mmref.trainer.run_config import load_run_config

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "color-codeword.toml"
CHANCE = 0.25  # 4 colours


def run(tmp_path, *overrides: str):
    config = load_run_config(CONFIG, [f"output_dir={tmp_path}", *overrides])
    start = time.perf_counter()
    summary = run_rl(config, Console(file=io.StringIO()))
    return summary, time.perf_counter() - start


@pytest.mark.timeout(900)
def test_policy_learns_from_images_and_not_from_blank_ones(tmp_path):
    learned, learned_s = run(tmp_path / "images")
    print(f"\ncolor-codeword: last-5 reward {learned.last5_reward:.3f} in {learned_s:.0f}s")
    blank, blank_s = run(tmp_path / "blank", "env.ablate_images=true")
    print(f"ablation (blank images): last-5 reward {blank.last5_reward:.3f} in {blank_s:.0f}s")
    assert learned.last5_reward >= 0.9 and learned_s <= 300
    assert blank.last5_reward <= CHANCE + 0.1 and blank_s <= 300
