"""``mmref sft`` (processed mode) learns the demonstrations and warm-starts ``mmref rl`` through ``model.path``."""

import json
from pathlib import Path

import pytest

from mmref.trainer.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "examples" / "learnability.toml")


def first_reward(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["reward_mean"]


@pytest.mark.timeout(600)
def test_sft_checkpoint_warm_starts_rl_above_a_cold_start(tmp_path):
    assert main(["sft", CONFIG, "--max-steps", "40", "--output-dir", str(tmp_path / "sft"),
                 "--set", "rollout.prompts_per_step=16", "--set", "train.lr=1e-2"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "sft_metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.25 * losses[0]
    checkpoint = tmp_path / "sft" / "checkpoints" / "sft"
    rl = ["--max-steps", "1", "--set", "rollout.prompts_per_step=16", "--set", "rollout.group_size=4"]
    assert main(["rl", CONFIG, *rl, "--output-dir", str(tmp_path / "cold")]) == 0
    assert main(["rl", CONFIG, *rl, "--output-dir", str(tmp_path / "warm"), "--set", f"model.path={checkpoint}"]) == 0
    cold, warm = first_reward(tmp_path / "cold"), first_reward(tmp_path / "warm")
    print(f"\nstep-0 reward: cold {cold:.2f}, warm-started from sft {warm:.2f}")
    assert warm >= 0.1 > cold  # a random policy names the right word ~1 in 78 samples
