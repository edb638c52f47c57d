"""Metric loggers: Weights & Biases and TensorBoard, fed the records ``metrics.jsonl`` gets.

``metrics.jsonl`` stays the source of truth; each enabled logger receives every record's
numbers (lists flattened to ``name/i``, strings and other values skipped) at its ``step``::

    loggers = Loggers.open(config.log, run_dir, config.model_dump())
    loggers.log(record)          # after metrics.jsonl got the same record
    loggers.close()

Both are optional extras (``uv sync --extra wandb``, ``--extra tensorboard``); enabling one
that is not installed is a ``ConfigError`` that says how to install it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from mmref.trainer.run_config import ConfigError, LogConfig


class Logger(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def scalars_of(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The record's numbers as (name, value): bools and ints as floats, lists and dicts flattened."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool | int | float):
            yield name, float(value)
        elif isinstance(value, list):
            yield from scalars_of({str(i): v for i, v in enumerate(value)}, f"{name}/")
        elif isinstance(value, dict):
            yield from scalars_of(value, f"{name}/")


def _require(module: str, extra: str, key: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{key} = true needs the {extra} package: uv sync --extra {extra} "
                          f"(or pip install {extra})") from None


class WandbLogger:
    """One W&B run per mmref run; ``log.wandb_mode = "offline"`` writes it under the run directory only."""

    def __init__(self, config: LogConfig, run_dir: Path, run_config: dict) -> None:
        wandb = _require("wandb", "wandb", "log.wandb")
        self.run = wandb.init(project=config.wandb_project, name=config.run_name or run_dir.name,
                              dir=str(run_dir), config=run_config, mode=config.wandb_mode, reinit="create_new")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    """Event files under ``<run>/tensorboard``."""

    def __init__(self, config: LogConfig, run_dir: Path, run_config: dict) -> None:
        _require("tensorboard", "tensorboard", "log.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Loggers:
    """Every enabled logger; ``log`` hands each the record's scalars."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    @classmethod
    def open(cls, config: LogConfig, run_dir: Path, run_config: dict) -> Loggers:
        chosen = [kind for kind, on in ((WandbLogger, config.wandb), (TensorBoardLogger, config.tensorboard)) if on]
        return cls([kind(config, run_dir, run_config) for kind in chosen])

    def log(self, record: dict[str, Any]) -> None:
        if self.loggers:
            scalars = dict(scalars_of(record))
            for logger in self.loggers:
                logger.log(scalars, int(record.get("step", 0)))

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
