"""Resumable training state: ``checkpoints/state/step_N``, beside the ``step_N`` exports.

    checkpoints/state/step_4/
      .metadata  __0_0.distcp ...  model, optimizer, LR scheduler (torch.distributed.checkpoint: any rank count)
      run.json                     steps done, the run config, Python and torch RNG, the env's data position

Every ``checkpoint.every`` steps and after the last, the trainer (every torchrun rank, or the
orchestrator's own process) writes its part into ``step_N.tmp``; the orchestrator then adds
``run.json`` and renames the directory into place, so a ``step_N`` is always complete. Only
the newest state is kept (it holds the optimizer: about three times the weights)::

    mmref rl CONFIG --resume    # continue the run in output_dir from its newest state

A run directory that already holds records is refused unless the run resumes
(``RunDirError``); a state whose run differs from the config (model, environment, seed) or has
already done ``max_steps`` is a ``ResumeError``.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, \
    set_state_dict

from mmref.trainer.errors import ResumeError, RunDirError
from mmref.trainer.run_config import RunConfig
from mmref.trainer.step import PolicyTrainer

RunStart = Literal["new", "resume", "replace"]  # replace: start over (mmref eval's own records)
RUN_FILE = "run.json"
# Sections that make a run what it is: a state saved under other values is another run's.
SAME_RUN_KEYS = ("seed", "model", "env")
_STEP_DIR = re.compile(r"step_(\d+)")


class StatePlan(BaseModel):
    """Where and when a trainer writes its state, and the state it starts from (part of the torchrun job)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str                        # <output_dir>/checkpoints/state
    every: int = Field(0, ge=0)      # checkpoint.every: 0 writes only after the last step
    max_steps: int = Field(ge=1)
    resume_from: str | None = None   # a state directory to load before the first step
    start_step: int = Field(0, ge=0)  # its steps done: the first step this trainer runs

    def due(self, steps_done: int) -> bool:
        """Whether a state is written after ``steps_done`` steps (every ``every`` and after the last)."""
        return steps_done == self.max_steps or (self.every > 0 and steps_done % self.every == 0)

    def pending(self, steps_done: int) -> Path:
        """Where the trainer writes the state of ``steps_done`` before the orchestrator commits it."""
        return _pending(Path(self.root), steps_done)


def save_trainer_state(trainer: PolicyTrainer, directory: str | Path) -> None:
    """Model, optimizer and scheduler into ``directory`` (DCP; a collective: every rank calls it)."""
    model, optimizer = get_state_dict(trainer.model, trainer.optimizer)
    _dcp(dcp.save, {"model": model, "optimizer": optimizer, "scheduler": trainer.scheduler.state_dict()}, directory)


def load_trainer_state(trainer: PolicyTrainer, directory: str | Path) -> None:
    """What ``save_trainer_state`` wrote, resharded onto this trainer's ranks (every rank calls it)."""
    model, optimizer = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model, "optimizer": optimizer, "scheduler": trainer.scheduler.state_dict()}
    _dcp(dcp.load, state, directory)
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])


def load_model_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Only the weights of a state into an unsharded ``model`` (the orchestrator's serve model)."""
    state = {"model": get_model_state_dict(model)}
    _dcp(dcp.load, state, directory)
    set_model_state_dict(model, state["model"])


def restore_trainer(trainer: PolicyTrainer, plan: StatePlan | None) -> int:
    """Load the plan's state into ``trainer`` (if it has one); the first step to run."""
    if plan is None or plan.resume_from is None:
        return 0
    load_trainer_state(trainer, plan.resume_from)
    return plan.start_step


def save_trainer_if_due(trainer: PolicyTrainer, plan: StatePlan | None, steps_done: int) -> None:
    """The trainer's part of the state after ``steps_done`` steps, when the plan says one is due."""
    if plan is not None and plan.due(steps_done):
        save_trainer_state(trainer, plan.pending(steps_done))


@dataclass(frozen=True)
class DrawState:
    """Where a run's random draws stand once a step's rollouts are collected: what the next step draws from."""

    python_rng: tuple         # the orchestrator's random.Random state (the episodes' seeds)
    torch_rng: bytes          # the process's CPU generator (sampling in the in-process engine)
    cuda_rng: tuple[bytes, ...]  # every CUDA device's generator, when CUDA is in use
    data_position: dict | None  # the environment's state_dict(), if it has one

    @classmethod
    def capture(cls, rng: random.Random, env: Any) -> DrawState:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(rng.getstate(), torch.get_rng_state().numpy().tobytes(),
                   tuple(s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()) if cuda else (),
                   env.state_dict() if hasattr(env, "state_dict") else None)

    def restore(self, rng: random.Random, env: Any) -> None:
        rng.setstate(self.python_rng)
        torch.set_rng_state(_byte_tensor(self.torch_rng))
        if self.cuda_rng and torch.cuda.is_available() and torch.cuda.device_count() == len(self.cuda_rng):
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in self.cuda_rng])
        if self.data_position is not None and hasattr(env, "load_state_dict"):
            env.load_state_dict(self.data_position)

    def to_json(self) -> dict:
        version, internal, gauss = self.python_rng
        return {"python_rng": [version, list(internal), gauss], "torch_rng": _b64(self.torch_rng),
                "cuda_rng": [_b64(s) for s in self.cuda_rng], "data_position": self.data_position}

    @classmethod
    def from_json(cls, data: dict) -> DrawState:
        version, internal, gauss = data["python_rng"]
        return cls((version, tuple(internal), gauss), base64.b64decode(data["torch_rng"]),
                   tuple(base64.b64decode(s) for s in data["cuda_rng"]), data["data_position"])


@dataclass(frozen=True)
class SavedState:
    """A committed ``state/step_N``: its directory, steps done, the run config it was saved under, the draws."""

    path: Path
    steps_done: int
    config: dict[str, Any]
    draws: DrawState

    def check_fits(self, config: RunConfig) -> None:
        """``ResumeError`` unless ``config`` continues this state's run and has steps left to run."""
        where = f"cannot resume from {self.path} (saved after {self.steps_done} steps)"
        now = config.model_dump(mode="json")
        for key in SAME_RUN_KEYS:
            if now[key] != self.config[key]:
                raise ResumeError(f"{where}: {key} is {json.dumps(now[key])} but the saved run has "
                                  f"{json.dumps(self.config[key])}; resume with the saved run's {key} "
                                  "or start a new --output-dir")
        if config.max_steps <= self.steps_done:
            raise ResumeError(f"{where}: max_steps = {config.max_steps} leaves nothing to run; "
                              f"raise it (--max-steps {self.steps_done + 1} or more) to train further")


class RunStates:
    """A run's ``checkpoints/state``: commits the trainer's pending states and finds the newest."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def plan(self, config: RunConfig, resumed: SavedState | None) -> StatePlan:
        """What the trainer needs: where and when to write, and the state to start from."""
        return StatePlan(root=str(self.root), every=config.checkpoint.every, max_steps=config.max_steps,
                         resume_from=str(resumed.path) if resumed else None,
                         start_step=resumed.steps_done if resumed else 0)

    def commit(self, steps_done: int, config: RunConfig, draws: DrawState) -> Path:
        """Add ``run.json`` to the trainer's pending state, rename it into place, drop older states."""
        pending = _pending(self.root, steps_done)
        if not (pending / ".metadata").is_file():
            raise FileNotFoundError(f"{pending} has no trainer state (.metadata) to commit")
        record = {"steps_done": steps_done, "config": config.model_dump(mode="json"), "draws": draws.to_json()}
        (pending / RUN_FILE).write_text(json.dumps(record))
        final = self.root / f"step_{steps_done}"
        shutil.rmtree(final, ignore_errors=True)  # a resumed run saving the same step again
        os.replace(pending, final)
        for old in self.committed()[:-1]:
            shutil.rmtree(old)
        return final

    def committed(self) -> list[Path]:
        """The complete ``step_N`` directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / RUN_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))

    def latest(self) -> SavedState:
        """The newest committed state; ``ResumeError`` if there is none."""
        states = self.committed()
        if not states:
            raise ResumeError(f"nothing to resume: {self.root} holds no saved state (a run saves one every "
                              "checkpoint.every steps and after its last step); start it without --resume")
        record = json.loads((states[-1] / RUN_FILE).read_text())
        return SavedState(states[-1], int(record["steps_done"]), record["config"], DrawState.from_json(record["draws"]))

    def clear_pending(self) -> None:
        """Remove ``step_N.tmp`` left by a run that stopped while writing one."""
        for stale in self.root.glob("step_*.tmp") if self.root.is_dir() else ():
            shutil.rmtree(stale)


def open_run_files(root: Path, files: tuple[Path, ...], start: RunStart, resumable: bool = True) -> None:
    """Create the run's record files: empty for a new run, kept for a resumed one (appended to).

    ``RunDirError`` when a new run finds an earlier run's records: nothing is overwritten.
    ``resumable``: whether the command has ``--resume`` (the error offers it).
    """
    if start == "new":
        earlier = [p.name for p in files if p.exists() and p.stat().st_size > 0]
        if earlier:
            fix = "pass --resume to continue it or choose a new --output-dir" if resumable else \
                "choose a new --output-dir"
            raise RunDirError(f"{root} already holds a run ({', '.join(earlier)}); {fix}")
    root.mkdir(parents=True, exist_ok=True)
    for path in files:
        if start == "resume":
            path.touch()
        else:
            path.write_text("")


def _pending(root: Path, steps_done: int) -> Path:
    return root / f"step_{steps_done}.tmp"


def _dcp(operation: Callable[..., Any], state: dict[str, Any], directory: str | Path) -> None:
    """``dcp.save`` or ``dcp.load``; without a process group DCP works alone and warns so: expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        operation(state, checkpoint_id=str(directory))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
