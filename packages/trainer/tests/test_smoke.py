"""The smoke module: its figures from metrics records, and its JSON line from a 2-step CPU run."""

import json
import subprocess
import sys

import pytest

from mmref.trainer.smoke import QWEN25_VL_3B_WIDTH, STEP_SPLIT, summarize
from mmref.trainer.models import tiny_config

FIELDS = {"model", "steps", "step_s", "tokens_per_s", "images_per_s", "peak_gpu_mem_gb", "mismatch_kl",
          "sync_s_per_gb", "wall_s"}


def test_summary_leaves_out_the_start_up_step_and_divides_sync_by_weight_gigabytes():
    history = [{"step_s": 9.0, "tokens_per_s": 1.0, "images_per_s": 1.0, "mismatch_kl": 0.5, "sync_s": 8.0},
               {"step_s": 2.0, "tokens_per_s": 10.0, "images_per_s": 4.0, "mismatch_kl": 0.1, "sync_s": 1.0},
               {"step_s": 4.0, "tokens_per_s": 20.0, "images_per_s": 6.0, "mismatch_kl": 0.3, "weight_load_s": 3.0}]
    summary = summarize("m", history, weights_bytes=2_000_000_000, peak_bytes=None, wall_s=1.0)
    assert summary["steps"] == 3 and summary["step_s"]["step_s"] == pytest.approx(3.0)
    assert summary["tokens_per_s"] == pytest.approx(15.0) and summary["mismatch_kl"] == pytest.approx(0.2)
    assert summary["sync_s_per_gb"] == pytest.approx(1.0)  # mean(1.0, 3.0) s over 2 GB
    assert summary["step_s"]["rollout_s"] is None and set(summary["step_s"]) == set(STEP_SPLIT)


def test_real_width_model_has_qwen25_vl_3b_hidden_and_vision_tower():
    config = tiny_config("qwen2.5-vl", vocab_size=1000, size=QWEN25_VL_3B_WIDTH)
    assert (config.text_config.hidden_size, config.text_config.num_attention_heads) == (2048, 16)
    assert (config.vision_config.hidden_size, config.vision_config.depth, config.vision_config.out_hidden_size) \
        == (1280, 32, 2048)


@pytest.mark.timeout(120)
def test_cpu_tiny_smoke_prints_one_json_line_with_every_figure(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mmref.trainer.smoke", "--device", "cpu", "--tiny-only", "--steps",
                           "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert (line["device"], line["engine"], line["errors"]) == ("cpu", "transformers", [])
    (run,) = line["runs"]
    assert set(run) == FIELDS and run["steps"] == 2 and run["peak_gpu_mem_gb"] is None
    assert run["tokens_per_s"] > 0 and run["images_per_s"] > 0 and run["sync_s_per_gb"] > 0
    assert run["mismatch_kl"] >= 0 and run["step_s"]["step_s"] > 0
