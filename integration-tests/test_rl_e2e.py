"""``mmref rl`` end to end for a few steps: the run directory a user gets, and no pixels on any hop."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mmref.trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_short_rl_run_writes_metrics_plot_viewer_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    code = main(["rl", str(ROOT / "examples" / "color-codeword.toml"), "--max-steps", "2", "--output-dir", str(out),
                 "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2"])
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["rollouts"] == 4 and 0.0 <= m["reward_mean"] <= 1.0 for m in metrics)
    # max_async = 1: step 1's rollouts were sampled while step 0 trained, with step 0's weights.
    assert [m["off_policy_lag"] for m in metrics] == [0, 1]
    # Byte counters of each hop: requests carry refs (a few KB), never pixel tensors.
    assert all(m["pixel_bytes_sent"] == 0 and 0 < m["request_bytes"] < 2_000_000 for m in metrics)
    assert Image.open(out / "reward.png").format == "PNG"
    assert (out / "checkpoints" / "latest" / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2
    page = (out / "viewer.html").read_text()
    sources = re.findall(r"src='([^']+)'", page)
    assert sources and all((out / s).resolve().is_relative_to(out.resolve()) and (out / s).exists() for s in sources)


def test_invalid_config_value_is_named_and_exits_2(tmp_path, capsys):
    assert main(["rl", str(ROOT / "examples" / "color-codeword.toml"), "--set", "rollout.group_size=1"]) == 2
    assert "rollout.group_size" in capsys.readouterr().err
