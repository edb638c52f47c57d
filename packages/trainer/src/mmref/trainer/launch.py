"""Start a torchrun job as a subprocess, watch it, and end the whole group on failure or timeout.

    result = launch(["-m", "mmref.trainer.train", "run.json"], LaunchConfig(nproc_per_node=2))
    result.returncode  # 0, or non-zero within seconds of any rank failing

torchrun already tears the other workers down when one exits non-zero or dies
(``--max-restarts 0``); this wrapper adds a wall-clock bound, puts the job in its own
process group so nothing outlives it, and keeps the tail of the output for the error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO


@dataclass(frozen=True)
class LaunchConfig:
    """torchrun arguments; ``nnodes``/``node_rank``/``master_addr`` for multi-node jobs."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_s: float = 3600.0
    # Seconds between SIGTERM and SIGKILL when ending the group: long enough to flush logs.
    grace_s: float = 5.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchResult:
    returncode: int
    output: str
    elapsed_s: float
    timed_out: bool


def torchrun_command(args: Sequence[str], config: LaunchConfig) -> list[str]:
    """The torchrun command line (``python -m torch.distributed.run``, so the venv's torch is used)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={config.nproc_per_node}", f"--nnodes={config.nnodes}",
        f"--node-rank={config.node_rank}", f"--master-addr={config.master_addr}",
        f"--master-port={config.master_port}", "--max-restarts=0",
        *args,
    ]


def launch(args: Sequence[str], config: LaunchConfig) -> LaunchResult:
    """Run torchrun with ``args`` (script or ``-m module`` plus its arguments) and wait, bounded."""
    start = time.monotonic()
    proc = spawn(args, config, subprocess.PIPE)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=config.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        end_group(proc, config.grace_s)
        output, _ = proc.communicate(timeout=config.grace_s + 5)
        output += f"\nmmref launch: job exceeded {config.timeout_s:.0f}s and was killed\n"
    finally:
        if proc.poll() is None:
            end_group(proc, config.grace_s)
    rc = proc.returncode if not timed_out else 124
    return LaunchResult(returncode=rc, output=output, elapsed_s=time.monotonic() - start, timed_out=timed_out)


def spawn(args: Sequence[str], config: LaunchConfig, output: IO[str] | int) -> subprocess.Popen:
    """Start torchrun in its own process group (so ``end_group`` reaches every rank), output to ``output``."""
    return subprocess.Popen(torchrun_command(args, config), stdout=output, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **config.env}, start_new_session=True)


def end_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the job's process group (torchrun and every rank), SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
