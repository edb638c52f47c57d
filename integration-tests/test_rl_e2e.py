"""``mmref rl`` end to end for a few steps: the run directory a user gets, trainer ranks under
torchrun fed refs over ZMQ, no pixels on any hop, and a dead rank ending the run with its cause."""

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmref.trainer.cli import main
from mmref.trainer.models import TINY_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "color-codeword.toml")
SMALL = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("nproc", [1, 2, 0], ids=["1-rank", "2-ranks", "in-process"])
def test_short_rl_run_writes_metrics_plot_viewer_and_checkpoints(tmp_path, nproc):
    out = tmp_path / "run"
    code = main(["rl", CONFIG, "--max-steps", "2", "--output-dir", str(out), "--set", f"train.nproc={nproc}", *SMALL,
                 "--set", "log.tensorboard=true"])
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()  # the logger got the records metrics.jsonl got
    assert [e.value for e in events.Scalars("reward_mean")] == pytest.approx([m["reward_mean"] for m in metrics])
    assert all(m["rollouts"] == 4 and 0.0 <= m["reward_mean"] <= 1.0 for m in metrics)
    assert all(m["ranks"] == max(1, nproc) and m["loss_tokens"] > 0 for m in metrics)
    # max_async = 1: step 1's rollouts were sampled while step 0 trained, with step 0's weights.
    assert [m["off_policy_lag"] for m in metrics] == [0, 1]
    # Byte counters of each hop: HTTP requests and ZMQ micro-batches carry refs and token ids,
    # a small fraction of what the same step's images weigh as pixel_values.
    for m in metrics:
        assert 0 < m["request_bytes"] and (m["transport_bytes"] > 0) == (nproc > 0)
        assert m["request_bytes"] + m["transport_bytes"] < m["pixel_values_bytes"] / 10
    assert Image.open(out / "reward.png").format == "PNG"
    assert all(m["sync_bytes"] > 0 and m["sync_s_per_gb"] > 0 for m in metrics)
    if nproc:  # rank 0 wrote the weights the server loaded; in process the engine took tensors, no file
        latest = json.loads((out / "checkpoints" / "latest" / "mmref.json").read_text())
        assert latest["weight_version"] == 2
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2
    page = (out / "viewer.html").read_text()
    sources = re.findall(r"src='([^']+)'", page)
    assert sources and all((out / s).resolve().is_relative_to(out.resolve()) and (out / s).exists() for s in sources)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", [f for f in ("qwen3.5", "kimi-k2.5") if f in TINY_FAMILIES])
def test_short_rl_run_trains_the_tiny_model_of_each_newer_family(tmp_path, family):
    """Rollouts served by the transformers engine, trained in process; the run's own pixel limits are dropped
    (Kimi's navit resize has none: the tiny model directory's processor config decides)."""
    lines = Path(CONFIG).read_text().splitlines()
    config = tmp_path / "run.toml"
    config.write_text("\n".join(line for line in lines if not line.startswith(("min_pixels", "max_pixels"))))
    out = tmp_path / "run"
    assert main(["rl", str(config), "--max-steps", "2", "--output-dir", str(out), "--set", "train.nproc=0", *SMALL,
                 "--set", f"model.family='{family}'"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["loss_tokens"] > 0 and m["rollouts"] == 4 and math.isfinite(m["loss"]) and m["grad_norm"] > 0
               for m in metrics)
    assert json.loads((out / "config.json").read_text())["model"]["family"] == family


def _trainer_ranks(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "mmref.trainer.train" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]


@pytest.mark.timeout(240)
def test_rank_killed_mid_run_ends_it_fast_with_its_cause_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mmref.trainer.cli", "rl", CONFIG, "--max-steps", "500",
                             "--output-dir", str(out), "--set", "train.nproc=2", *SMALL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 150
        while not ((out / "trainer.jsonl").exists() and (out / "trainer.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        ranks = {int(p.environ()["RANK"]): p for p in _trainer_ranks(proc.pid)}
        assert sorted(ranks) == [0, 1]
        started = psutil.Process(proc.pid).children(recursive=True)  # torchrun's agent and both ranks
        killed = time.monotonic()
        ranks[1].kill()
        output, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output
    assert "TrainerJobError" in output and "trainer ranks exited" in output
    assert elapsed < 30
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive


def test_invalid_config_value_is_named_and_exits_2(tmp_path, capsys):
    assert main(["rl", CONFIG, "--set", "rollout.group_size=1"]) == 2
    assert "rollout.group_size" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_is_one_line_naming_the_extra(tmp_path, capsys):
    # engine vllm starts a child `mmref serve --engine vllm`; here it exits at once and says why.
    assert main(["rl", CONFIG, "--output-dir", str(tmp_path), "--set", "inference.engine='vllm'"]) == 1
    err = capsys.readouterr().err
    assert "InferenceStartError" in err and "needs the 'vllm' extra" in err and "Traceback" not in err
    metrics = tmp_path / "metrics.jsonl"
    assert not (metrics.exists() and metrics.read_text())  # nothing ran


def test_in_process_engine_takes_the_inference_server_keys(tmp_path):
    import torch
    from rich.console import Console

    from mmref.trainer.orchestrator import Orchestrator
    from mmref.trainer.run_config import load_run_config

    config = load_run_config(CONFIG, [f"output_dir='{tmp_path}'", "inference.max_model_len=512",
                                      "inference.dtype='bfloat16'", "train.nproc=0"])
    orch = Orchestrator(config, tmp_path, Console(quiet=True))
    try:
        engine = orch.served.engine
        assert engine.max_model_len == 512 and next(engine.model.parameters()).dtype == torch.bfloat16
    finally:
        orch.loggers.close()
