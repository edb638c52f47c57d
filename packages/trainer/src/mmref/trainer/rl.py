"""``mmref rl``: the whole loop on one machine, images moving as refs end to end.

    env (PIL images) -> prepare_images -> store -> refs -> render/bridge -> HTTP generate
      -> traces -> GRPO samples -> packed micro-batches (refs) -> materialize -> step
      -> checkpoint -> POST /update_weights -> next step

The inference server runs in this process behind uvicorn on a loopback port (real HTTP), as
a child ``mmref serve`` of this process (``inference.process = "child"``, the default for
``inference.engine = "vllm"``; its output in inference.log), or is a running ``mmref serve`` at
``inference.url``; a server in another process is checked to serve this run's model and gets
each step's weights as a checkpoint and a POST.
The policy trains on ``train.nproc`` torchrun ranks fed micro-batches of refs over ZMQ
(rank 0 writes each step's weights and POSTs ``/update_weights``), or in this process when
``train.nproc = 0``. The run directory holds the config, metrics.jsonl, rollouts.jsonl,
checkpoints, the store, trainer.log (the ranks' output), the reward curve and the viewer.
``mmref rl CONFIG --resume`` continues a run from its newest saved state (see ``mmref.trainer.resume``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mmref.trainer.orchestrator import Orchestrator, train_loop
from mmref.trainer.report import RolloutRecord, read_jsonl, write_reward_curve, write_viewer
from mmref.trainer.run_config import RunConfig
from mmref.trainer.step_record import StepRecord


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    final_reward: float
    last5_reward: float
    wall_s: float


def run_rl(config: RunConfig, console: Console | None = None, resume: bool = False) -> RunSummary:
    """Run ``config`` to completion (``resume``: from the newest state in its output directory, appending to its
    records); always shuts the server down."""
    console = console or Console()
    run_dir = Path(config.output_dir)
    start = time.perf_counter()
    orch = Orchestrator(config, run_dir, console, "resume" if resume else "new")
    with orch.inference_server() as url, Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("starting", total=config.max_steps, completed=orch.start_step)
        try:
            with orch.hosting_agents(url) as orch.agents:
                history = asyncio.run(train_loop(orch, url, progress, task))
        finally:
            orch.loggers.close()
    write_reward_curve(read_jsonl(run_dir / "metrics.jsonl"), run_dir / "reward.png",  # a resumed run's too
                       chance=getattr(orch.env, "chance", None))
    write_viewer(run_dir, [RolloutRecord.from_json(json.dumps(r)) for r in read_jsonl(run_dir / "rollouts.jsonl")])
    summary = RunSummary(run_dir, len(history), history[-1].reward_mean,
                         sum(r.reward_mean for r in history[-5:]) / len(history[-5:]), time.perf_counter() - start)
    print_summary(console, summary, history)
    return summary


def print_summary(console: Console, summary: RunSummary, history: list[StepRecord]) -> None:
    table = Table(title=f"mmref rl: {summary.run_dir}")
    for column in ("steps", "ranks", "reward (last 5)", "wall s", "rollout s/step", "train s/step", "request KB/step"):
        table.add_column(column, justify="right")
    n = len(history)
    table.add_row(str(n), str(history[-1].trainer["ranks"]), f"{summary.last5_reward:.3f}", f"{summary.wall_s:.1f}",
                  f"{sum(r.rollout_s for r in history) / n:.2f}", f"{sum(r.train_s for r in history) / n:.2f}",
                  f"{sum(r.request_bytes for r in history) / n / 1024:.0f}")
    console.print(table)
    console.print(f"reward curve: {summary.run_dir / 'reward.png'}   viewer: {summary.run_dir / 'viewer.html'}")
