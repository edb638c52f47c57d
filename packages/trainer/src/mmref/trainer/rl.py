"""``mmref rl``: the whole loop on one machine, images moving as refs end to end.

    env (PIL images) -> prepare_images -> store -> refs -> render/bridge -> HTTP generate
      -> traces -> GRPO samples -> packed micro-batches (refs) -> materialize -> step
      -> checkpoint -> POST /update_weights -> next step

The inference server runs in this process behind uvicorn on a loopback port (real HTTP).
The policy trains on ``train.nproc`` torchrun ranks fed micro-batches of refs over ZMQ
(rank 0 writes each step's weights and POSTs ``/update_weights``), or in this process when
``train.nproc = 0``. The run directory holds the config, metrics.jsonl, rollouts.jsonl,
checkpoints, the store, trainer.log (the ranks' output), the reward curve and the viewer.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mmref.client.environment import Vocabulary, vocabulary_of
from mmref.client.errors import EnvFailedError
from mmref.client.rollout import DroppedGroup, ResetCopies, RolloutClock, play_groups
from mmref.client.trace import Trace
from mmref.client.train_client import Sampling, TrainClient
from mmref.renderers import ImageStore
from mmref.renderers.render import create_renderer
from mmref.trainer.environments import run_environment
from mmref.trainer.evaluation import EvalResult, evaluate
from mmref.trainer.export import StepExports
from mmref.trainer.inference.engine import TransformersEngine
from mmref.trainer.inference.server import create_app
from mmref.trainer.inference.threaded import serve_in_thread
from mmref.trainer.inference.serving import ServedModel
from mmref.trainer.loggers import Loggers
from mmref.trainer.models import TinySize, image_token_ids_of
from mmref.trainer.pack import PackedRow, occupancy, pack
from mmref.trainer.policy import Policy, load_policy
from mmref.trainer.precision import prepare_model, resolve_dtype
from mmref.trainer.report import RolloutRecord, TurnRecord, read_jsonl, write_reward_curve, write_viewer
from mmref.trainer.rl_trainer import InProcessTrainer, RLTrainer, TorchrunTrainer, cpu_threads_per_role
from mmref.trainer.run_config import ConfigError, RunConfig
from mmref.trainer.samples import TrainingSample, group_advantages, group_turn_advantages
from mmref.trainer.step import PolicyTrainer, frozen_copy
from mmref.trainer.task_tokenizer import task_tokenizer
from mmref.trainer.tiny_dir import write_tiny_model_dir
from mmref.trainer.train import DistributedJob

TASK_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}  # the tiny default's images: small, CPU-fast


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    final_reward: float
    last5_reward: float
    wall_s: float


class RunDir:
    """The files of one run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("checkpoints", "store"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.metrics = root / "metrics.jsonl"
        self.rollouts = root / "rollouts.jsonl"
        for path in (self.metrics, self.rollouts):
            path.write_text("")

    def append(self, path: Path, line: str) -> None:
        with path.open("a") as f:
            f.write(line + "\n")


def build_policy(config: RunConfig, vocabulary: Vocabulary | None) -> Policy:
    """The run's model directory loaded: ``model.path``, else the tiny default written into the run directory."""
    path = config.model.path or write_task_model_dir(config, vocabulary)
    return load_policy(path, min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels)


def write_task_model_dir(config: RunConfig, vocabulary: Vocabulary | None) -> Path:
    """``<output_dir>/model``: the tiny ``model.family`` model with the tokenizer of the task's ``vocabulary``."""
    tokenizer = task_tokenizer(vocabulary)
    size = TinySize(hidden_size=config.model.hidden_size, num_layers=config.model.num_layers,
                    vision_depth=config.model.vision_depth)
    return write_tiny_model_dir(config.model.family, Path(config.output_dir) / "model", tokenizer=tokenizer,
                                seed=config.model.seed, size=size, **TASK_PIXELS)


def pick_device(config: RunConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


class Orchestrator:
    """Owns the loop: rollouts against the server, samples, a training step, weight sync."""

    def __init__(self, config: RunConfig, run_dir: Path, console: Console) -> None:
        self.config, self.console = config, console
        self.run = RunDir(run_dir)
        (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
        self.env = run_environment(config)
        self.data_positions: dict[int, dict] = {}  # step -> the env's data position after that step's draws
        vocabulary = vocabulary_of(self.env)
        torch.manual_seed(config.seed)
        loaded = build_policy(config, vocabulary)
        self.model_dir, self.family = loaded.path, loaded.family
        self.tokenizer, self.policy = loaded.tokenizer, loaded.model
        self.spec, self.processor = loaded.spec, loaded.processor
        # Trainer ranks start from the model directory, so the served model is the only copy here;
        # in process the trainer trains self.policy while the engine samples from its own copy.
        serve_model = copy.deepcopy(self.policy) if config.train.nproc == 0 else self.policy
        self.device = device = pick_device(config)
        self.store = ImageStore(run_dir / "store")
        self.renderer = create_renderer(self.tokenizer, self.family, spec=self.spec)
        banned = image_token_ids_of(self.policy)
        engine = TransformersEngine(serve_model, banned, self.renderer.stop_token_ids,
                                    pad_token_id=self.renderer.stop_token_ids[0], device=device,
                                    dtype=resolve_dtype(config.train.dtype, device))
        self.served = ServedModel(config.model.path or f"tiny-{self.family}", self.family, self.spec, self.processor,
                                  engine, self.renderer.image_pad_id)
        self.rng = random.Random(config.seed)
        self.loggers = Loggers.open(config.log, run_dir, config.model_dump())

    def make_trainer(self, inference_url: str) -> RLTrainer:
        """Torchrun ranks (``train.nproc`` of them) starting from the served weights, or this process."""
        config, checkpoints = self.config, self.run.root / "checkpoints"
        if config.train.nproc == 0:
            model = prepare_model(self.policy, config.train, self.device)  # dtype, checkpointing, frozen vision
            trainer = PolicyTrainer(model, store=self.store, spec=self.spec, processor=self.processor, config=config.train,
                                    image_token_ids=image_token_ids_of(self.policy), total_steps=config.max_steps,
                                    reference=frozen_copy(self.policy) if config.train.kl_coef > 0 else None)
            return InProcessTrainer(trainer, self.served.engine, exports=self.step_exports(trainer.model))
        timeout = config.train.rank_timeout_s
        job = DistributedJob(
            family=self.family, store_root=str(self.store.root), pub_address="", ready_address="",
            steps=config.max_steps, min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels,
            model_path=str(self.model_dir), checkpoint_dir=str(checkpoints / "latest"), inference_url=inference_url,
            device=config.device, ready_timeout_s=timeout, recv_timeout_s=timeout, collective_timeout_s=timeout,
            train=config.train)
        return TorchrunTrainer(job, config.train.nproc, self.run.root, timeout, threads=self.threads_per_role()[1],
                               exports=self.step_exports(self.served.engine.model))

    def step_exports(self, model: Any) -> StepExports:
        """``checkpoints/step_N`` model directories of ``model`` with this run's tokenizer and processor."""
        every, keep = self.config.checkpoint.every, self.config.checkpoint.keep_last
        return StepExports(self.run.root / "checkpoints", model, self.tokenizer, self.processor, self.family,
                           every=every, keep_last=keep, max_steps=self.config.max_steps)

    def threads_per_role(self) -> tuple[int | None, int | None]:
        """(this process's, each rank's) torch threads on CPU: split when sampling overlaps training; None: defaults."""
        if self.device != "cpu" or self.config.max_async == 0 or self.config.train.nproc == 0:
            return None, None
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cpu_threads_per_role(cpus, self.config.train.nproc, overlapped=True)

    async def collect(self, client: TrainClient, step: int) -> tuple[list[Trace], int, dict[str, float]]:
        """One GRPO batch (``prompts_per_step`` episodes, each played ``group_size`` times), its request bytes
        and where its seconds went (client env/render, engine sampling, the rest: HTTP and the server).

        A group whose environment raised is dropped, logged and counted (``times["dropped"]``, rollouts);
        a step whose every group failed raises ``EnvFailedError``.
        """
        cfg = self.config.rollout
        seeds = [self.rng.randrange(2**31) for _ in range(cfg.prompts_per_step)]
        # One reset per group, deep-copied per member: plays what group_size same-seed episodes would.
        groups, ids, dropped = [], [], []
        for prompt, seed in enumerate(seeds):
            try:
                groups.append(ResetCopies(self.env.episode(seed), cfg.group_size))
                ids.append(f"s{step}-p{prompt}")
            except EnvFailedError as exc:
                dropped.append(DroppedGroup(f"s{step}-p{prompt}", cfg.group_size, exc))
        if hasattr(self.env, "state_dict"):
            self.data_positions[step] = self.env.state_dict()
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
        sent, requests, engine = client.bytes_sent, client.requests, self.served.engine
        clock, generated, batches, start = RolloutClock(), engine.generate_s, engine.batches, time.perf_counter()
        # A group's members open alike (same seed): turn one is one n=group_size request per group.
        batch = await play_groups(groups, self.renderer, client, self.store, sampling, concurrency=cfg.concurrency,
                                  group_ids=ids, clock=clock)
        dropped += batch.dropped
        self.log_dropped(step, dropped)
        if not batch.groups:
            raise EnvFailedError(f"step {step}: every one of {len(seeds)} groups failed in the environment, so "
                                 f"there is nothing to train on; the first error: {dropped[0].error}")
        wall, generate_s = time.perf_counter() - start, engine.generate_s - generated
        times = {"collect_s": wall, "env_s": clock.env_s, "render_s": clock.render_s, "generate_s": generate_s,
                 "http_server_s": wall - clock.env_s - clock.render_s - generate_s,
                 "requests": client.requests - requests, "engine_batches": engine.batches - batches,
                 "dropped": sum(d.size for d in dropped)}
        return batch.traces, client.bytes_sent - sent, times

    def log_dropped(self, step: int, dropped: list[DroppedGroup]) -> None:
        """Each dropped group on the console, with the environment's traceback in ``env_errors.log``."""
        for group in dropped:
            self.console.print(f"[yellow]step {step}: dropped group {group.group_id} ({group.size} rollouts): "
                               f"{escape(str(group.error))}[/yellow]")
            cause = group.error.__cause__ or group.error
            lines = traceback.format_exception(type(cause), cause, cause.__traceback__)
            self.run.append(self.run.root / "env_errors.log", f"step {step} group {group.group_id}: "
                                                              f"{group.error}\n{''.join(lines)}")

    async def evaluate(self, client: TrainClient, weight_version: int) -> EvalResult:
        """``[eval]``'s held-out episodes on the weights the server holds now (``weight_version``)."""
        return await evaluate(self.env, self.config, self.renderer, client, self.store, weight_version)

    def eval_due(self, step: int) -> bool:
        """Whether to evaluate after ``step``: every ``eval.every`` steps and after the last."""
        every = self.config.eval.every
        return every > 0 and ((step + 1) % every == 0 or step + 1 == self.config.max_steps)

    def samples(self, traces: list[Trace]) -> list[TrainingSample]:
        """Every trace's segments, with advantages normalized within its group (per turn under ``credit = "turn"``)."""
        by_group: dict[str, list[Trace]] = {}
        for trace in traces:
            by_group.setdefault(trace.group_id or trace.rollout_id, []).append(trace)
        samples = []
        for group in by_group.values():
            if self.config.rollout.credit == "turn":
                advantages = group_turn_advantages([t.returns_to_go() for t in group])
            else:
                advantages = group_advantages([t.reward for t in group])
            for trace, advantage in zip(group, advantages):
                for segment in trace.segments():
                    samples.append(TrainingSample.from_segment(segment, advantage, self.renderer.image_pad_id))
        return samples

    def record(self, step: int, traces: list[Trace], metrics: dict[str, Any], evals: Sequence[EvalResult] = ()) -> None:
        """The step's metrics, a few rollouts (and eval rollouts) for the viewer, the env's data position."""
        self.run.append(self.run.metrics, json.dumps(metrics))
        self.loggers.log(metrics)
        shown = [(t, t.rollout_id) for t in traces[:: max(1, len(traces) // 4)][:4]]
        shown += [(t, f"eval v{e.weight_version} {t.rollout_id}") for e in evals for t in e.traces[:2]]
        for trace, label in shown:
            turns, seen_images, seen_messages = [], 0, 0
            for node in trace.nodes:
                text = self.tokenizer.decode(node.completion_ids, skip_special_tokens=True)
                new_images = [s.ref.asset for s in node.images[seen_images:]]
                user_text = user_text_of(trace.messages[seen_messages:node.num_messages])
                turns.append(TurnRecord(user_text=user_text, images=new_images, completion=text))
                seen_images, seen_messages = len(node.images), node.num_messages
            self.run.append(self.run.rollouts, RolloutRecord(step, label, trace.reward, turns).to_json())
        if step in self.data_positions:
            (self.run.root / "checkpoints" / "data_position.json").write_text(
                json.dumps({"step": step, "position": self.data_positions.pop(step)}))


def user_text_of(messages: list[dict[str, Any]]) -> str:
    """The text the user (the environment) said in ``messages``: string contents and text parts."""
    texts = []
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or []
                                                             if isinstance(p, dict) and p.get("type") == "text"]
        texts.extend(p for p in parts if p)
    return "\n".join(texts)



def reward_by_turn(traces: list[Trace]) -> list[float]:
    """Mean reward earned at each turn index, over the rollouts that reached it (empty without turn rewards)."""
    earned: dict[int, list[float]] = {}
    for trace in traces:
        before = 0.0
        for turn, total in enumerate(trace.turn_rewards):
            earned.setdefault(turn, []).append(total - before)
            before = total
    return [sum(v) / len(v) for _, v in sorted(earned.items())]


def pixel_values_nbytes(rows: list[PackedRow], spec) -> int:
    """What the step's images would weigh as float32 pixel_values: what refs keep off every hop."""
    return sum(spec.pixel_values_nbytes(slot.ref.grid_thw) for row in rows for slot in row.images)


async def _loop(orch: Orchestrator, base_url: str, progress: Progress, task: Any) -> list[dict]:
    trainer = orch.make_trainer(base_url)
    sampler_threads, _ = orch.threads_per_role()
    threads = torch.get_num_threads()
    if sampler_threads is not None:  # the inference engine's forward passes run in this process
        torch.set_num_threads(sampler_threads)
    ok = False
    try:
        progress.update(task, description=f"starting {orch.config.train.nproc or 'in-process'} trainer rank(s)")
        await trainer.start()
        history = await _steps(orch, trainer, base_url, progress, task)
        ok = True
        return history
    finally:
        torch.set_num_threads(threads)
        await trainer.close(ok)


async def _steps(orch: Orchestrator, trainer: RLTrainer, base_url: str, progress: Progress, task: Any) -> list[dict]:
    config = orch.config
    history = []
    # Evaluation has its own client: the steps' request counters stay the rollouts' own.
    connections = config.rollout.concurrency
    async with TrainClient(base_url, max_connections=connections) as client, \
            TrainClient(base_url, max_connections=connections) as eval_client:
        evals = [await orch.evaluate(eval_client, 0)] if config.eval.before_training else []
        pending = asyncio.create_task(orch.collect(client, 0))
        for step in range(config.max_steps):
            start = time.perf_counter()
            traces, request_bytes, rollout_times = await pending
            rollout_s = time.perf_counter() - start  # the wait for this step's rollouts
            if config.max_async >= 1 and step + 1 < config.max_steps:
                # Off-policy by at most one step: the next batch samples while this one trains.
                pending = asyncio.create_task(orch.collect(client, step + 1))
            mark = time.perf_counter()
            samples = orch.samples(traces)
            samples_s, mark = time.perf_counter() - mark, time.perf_counter()
            rows = pack(samples, config.train.max_seq_len)
            pack_s, mark, loaded = time.perf_counter() - mark, time.perf_counter(), orch.served.engine.load_s
            step_metrics = await trainer.step(step, rows)  # returns once the server has the new weights
            trainer_s, weight_load_s = time.perf_counter() - mark, orch.served.engine.load_s - loaded
            train_s = time.perf_counter() - start - rollout_s
            if config.max_async == 0 and step + 1 < config.max_steps:
                pending = asyncio.create_task(orch.collect(client, step + 1))
            versions = [n.weight_version or 0 for t in traces for n in t.nodes]
            lag = step - min(versions)  # weight version v = after v steps; this step trains version `step`
            rewards = [t.reward for t in traces]
            tokens = sum(len(n.completion_ids) for t in traces for n in t.nodes)
            wall = time.perf_counter() - start
            dropped = rollout_times.pop("dropped")
            metrics = {"step": step, "reward_mean": sum(rewards) / len(rewards), "reward_by_turn": reward_by_turn(traces),
                       "rollouts": len(traces), "rollouts_dropped": dropped,
                       "samples": len(samples), "rows": len(rows), "occupancy": occupancy(rows, config.train.max_seq_len),
                       "tokens_per_s": tokens / wall, "images_per_s": sum(len(t.nodes) for t in traces) / wall,
                       "rollout_s": rollout_s, "train_s": train_s, "step_s": wall,
                       **{f"rollout_{k}": v for k, v in rollout_times.items()},
                       "samples_s": samples_s, "pack_s": pack_s, "trainer_s": trainer_s, "weight_load_s": weight_load_s,
                       "request_bytes": request_bytes,
                       "pixel_values_bytes": pixel_values_nbytes(rows, orch.spec), "off_policy_lag": lag,
                       **step_metrics}
            if orch.eval_due(step):
                evals.append(await orch.evaluate(eval_client, step + 1))
            if evals:
                metrics["evals"] = [e.as_dict() for e in evals]
            orch.record(step, traces, metrics, evals)
            evals = []
            history.append(metrics)
            progress.update(task, advance=1, description=f"step {step + 1}/{config.max_steps} reward "
                                                         f"{metrics['reward_mean']:.2f} tok/s {metrics['tokens_per_s']:.0f}")
    return history


def run_rl(config: RunConfig, console: Console | None = None) -> RunSummary:
    """Run ``config`` to completion; always shuts the server down."""
    if config.inference.engine != "transformers":
        raise ConfigError(f"inference.engine = {config.inference.engine!r}: mmref rl samples with its built-in "
                          "transformers engine only; vLLM serves checkpoints with `mmref serve --engine vllm`")
    console = console or Console()
    run_dir = Path(config.output_dir)
    start = time.perf_counter()
    orch = Orchestrator(config, run_dir, console)
    app = create_app(orch.served, orch.store)
    with serve_in_thread(app, config.inference.host, config.inference.port) as url, Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("starting", total=config.max_steps)
        try:
            history = asyncio.run(_loop(orch, url, progress, task))
        finally:
            orch.loggers.close()
    write_reward_curve(history, run_dir / "reward.png", chance=getattr(orch.env, "chance", None))
    write_viewer(run_dir, [RolloutRecord.from_json(json.dumps(r)) for r in read_jsonl(run_dir / "rollouts.jsonl")])
    summary = RunSummary(run_dir, len(history), history[-1]["reward_mean"],
                         sum(m["reward_mean"] for m in history[-5:]) / len(history[-5:]), time.perf_counter() - start)
    print_summary(console, summary, history)
    return summary


def print_summary(console: Console, summary: RunSummary, history: list[dict]) -> None:
    table = Table(title=f"mmref rl: {summary.run_dir}")
    for column in ("steps", "ranks", "reward (last 5)", "wall s", "rollout s/step", "train s/step", "request KB/step"):
        table.add_column(column, justify="right")
    n = len(history)
    table.add_row(str(n), str(history[-1]["ranks"]), f"{summary.last5_reward:.3f}", f"{summary.wall_s:.1f}",
                  f"{sum(m['rollout_s'] for m in history) / n:.2f}", f"{sum(m['train_s'] for m in history) / n:.2f}",
                  f"{sum(m['request_bytes'] for m in history) / n / 1024:.0f}")
    console.print(table)
    console.print(f"reward curve: {summary.run_dir / 'reward.png'}   viewer: {summary.run_dir / 'viewer.html'}")
