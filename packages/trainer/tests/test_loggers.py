"""W&B (offline) and TensorBoard get the records metrics.jsonl gets; a missing extra is a clear error."""

import sys
import time

import pytest

from mmref.trainer.loggers import Loggers, scalars_of
from mmref.trainer.run_config import ConfigError, LogConfig

RECORDS = [{"step": s, "reward_mean": 0.25 * s, "reward_by_turn": [0.1 * s, 0.2], "note": "x", "ok": True}
           for s in range(3)]


def test_scalars_flatten_lists_and_skip_text():
    assert dict(scalars_of(RECORDS[1])) == {"step": 1.0, "reward_mean": 0.25, "reward_by_turn/0": 0.1,
                                            "reward_by_turn/1": 0.2, "ok": 1.0}


def test_tensorboard_event_files_hold_every_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = Loggers.open(LogConfig(tensorboard=True), tmp_path, {})
    for record in RECORDS:
        loggers.log(record)
    loggers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert "reward_by_turn/1" in events.Tags()["scalars"]


def test_wandb_offline_run_is_written_under_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = Loggers.open(LogConfig(wandb=True, wandb_mode="offline", run_name="t"), tmp_path, {"seed": 3})
    for record in RECORDS:
        loggers.log(record)
    loggers.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # the record log `wandb sync` uploads
    deadline = time.monotonic() + 20
    while b"reward_by_turn/1" not in (data := run.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.1)  # wandb's writer service flushes it shortly after finish() returns
    assert b"reward_mean" in data and b"reward_by_turn/1" in data and b"seed" in data


def test_an_enabled_logger_that_is_not_installed_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match="log.wandb = true needs the wandb package: uv sync --extra wandb"):
        Loggers.open(LogConfig(wandb=True, wandb_mode="offline"), tmp_path, {})
