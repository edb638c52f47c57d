"""GPU smoke: ``mmref rl`` for a few steps on CUDA (marker ``gpu``; skipped without a CUDA device).

Run where a GPU is available: ``uv run pytest -m gpu integration-tests/gpu -s``. It prints
the step times and reward so they can go in the README.
"""

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from mmref.trainer.rl import run_rl
from mmref.trainer.run_config import load_run_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
CONFIG = Path(__file__).resolve().parents[2] / "examples" / "learnability.toml"


@pytest.mark.timeout(900)
def test_rl_steps_on_cuda(tmp_path):
    config = load_run_config(CONFIG, ["device=cuda", "max_steps=5", f"output_dir={tmp_path}"])
    summary = run_rl(config, Console(file=io.StringIO()))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"\nGPU {torch.cuda.get_device_name()}: {summary.steps} steps in {summary.wall_s:.1f}s, "
          f"step {metrics[-1]['step_s']:.2f}s (rollout {metrics[-1]['rollout_s']:.2f}s, train {metrics[-1]['train_s']:.2f}s)")
    assert summary.steps == 5 and all(m["loss_tokens"] > 0 for m in metrics)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
