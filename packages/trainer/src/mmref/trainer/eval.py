"""``mmref eval``: a checkpoint on the run's held-out episodes (``[eval]``), without training.

    uv run mmref eval examples/shapes-dataset.toml --checkpoint runs/shapes-dataset/checkpoints/step_80

Serves the checkpoint as ``mmref rl`` does, plays ``eval.num_examples`` episodes of
``eval.split`` once each at ``eval.temperature`` and writes ``<output_dir>/eval/eval.json``
(the result) and its viewer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from rich.console import Console

from mmref.client.train_client import TrainClient
from mmref.trainer.checkpoint import weight_version_of
from mmref.trainer.evaluation import EvalResult
from mmref.trainer.report import RolloutRecord, read_jsonl, write_viewer
from mmref.trainer.orchestrator import Orchestrator
from mmref.trainer.run_config import RunConfig


def run_eval(config: RunConfig, checkpoint: str | None, console: Console | None = None) -> EvalResult:
    """Evaluate ``checkpoint``, a model directory such as ``checkpoints/step_N`` (None: the config's own
    ``model.path``, or the initial weights)."""
    console = console or Console()
    if checkpoint is not None:
        config = config.model_copy(update={"model": config.model.model_copy(update={"path": checkpoint})})
    version = weight_version_of(config.model.path) if config.model.path else 0
    # The checkpoint is served here (in process, or the engine's child server): a remote inference.url serves the
    # run's own weights.
    config = config.model_copy(update={"inference": config.inference.model_copy(update={"url": None})})
    out = Path(config.output_dir) / "eval"
    orch = Orchestrator(config, out, console, "replace")  # a new evaluation replaces the last one
    with orch.inference_server(version) as url, orch.hosting_agents(url) as orch.agents:
        result = asyncio.run(_evaluate(orch, url, version))
    orch.record(0, [], {"step": 0, "evals": [result.as_dict()]}, [result])
    write_viewer(out, [RolloutRecord.from_json(json.dumps(r)) for r in read_jsonl(out / "rollouts.jsonl")])
    (out / "eval.json").write_text(json.dumps(result.as_dict()))
    console.print(f"mmref eval: weight version {version}: reward {result.reward_mean:.3f} over {result.rollouts} "
                  f"{config.eval.split} episodes (temperature {result.temperature}, "
                  f"{result.rollouts_dropped} dropped)   {out / 'eval.json'}")
    return result


async def _evaluate(orch: Orchestrator, url: str, version: int) -> EvalResult:
    async with TrainClient(url, batch=True) as client:
        return await orch.evaluate(client, version)
