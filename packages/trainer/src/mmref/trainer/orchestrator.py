"""The orchestrator: rollouts against the inference server, samples, packing, a training step, weight sync.

    orch = Orchestrator(config, run_dir, console)            # the environment by name: it knows no task
    history = asyncio.run(train_loop(orch, inference_url, progress, task))   # one StepRecord per step

Each step: ``collect`` plays ``prompts_per_step`` groups of ``group_size`` (environment
episodes, or agent code through the interception server), ``samples`` turns the traces into
GRPO samples, ``pack`` makes rows of refs, the trainer (torchrun ranks over the transport, or
this process) steps and the server loads the new weights; ``record`` writes the step's
``StepRecord`` and a few rollouts for the viewer. With ``max_async = 1`` the next batch samples
while this one trains.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from mmref.client.agent import AgentHost, is_agent, play_agent_groups
from mmref.client.environment import vocabulary_of
from mmref.client.errors import EnvFailedError
from mmref.client.rollout import DroppedGroup, GroupBatch, ResetCopies, RolloutClock, play_groups
from mmref.client.trace import Trace
from mmref.client.train_client import TrainClient
from mmref.renderers import ImageStore
from mmref.renderers.render import create_renderer
from mmref.trainer.agent_host import host_agents
from mmref.trainer.environments import agent_sampling, run_environment, run_sampling
from mmref.trainer.evaluation import EvalResult, evaluate
from mmref.trainer.export import StepExports
from mmref.trainer.inference.engine import TransformersEngine
from mmref.trainer.inference.serving import ServedModel
from mmref.trainer.job import DistributedJob
from mmref.trainer.loggers import Loggers
from mmref.trainer.model_identity import model_identity
from mmref.trainer.models import image_token_ids_of
from mmref.trainer.pack import PackedRow, occupancy, pack
from mmref.trainer.policy_setup import build_policy, pick_device
from mmref.trainer.precision import prepare_model, resolve_dtype
from mmref.trainer.remote import ExpectedModel, RemoteEngineCounters, rollout_server
from mmref.trainer.report import RolloutRecord, TurnRecord
from mmref.trainer.resume import DrawState, RunStart, RunStates, load_model_weights, open_run_files, restore_trainer
from mmref.trainer.rl_trainer import InProcessTrainer, RLTrainer, TorchrunTrainer, cpu_threads_per_role, post_checkpoint
from mmref.trainer.run_config import RunConfig
from mmref.trainer.serve_process import ServeProcess, child_server
from mmref.trainer.samples import TrainingSample, group_advantages, group_turn_advantages
from mmref.trainer.step import PolicyTrainer, frozen_copy
from mmref.trainer.step_record import StepRecord


class RunDir:
    """The files of one run; a new run refuses a directory with an earlier run's records (see ``resume``)."""

    def __init__(self, root: Path, start: RunStart = "new") -> None:
        self.root = root
        for sub in ("checkpoints", "store"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.metrics = root / "metrics.jsonl"
        self.rollouts = root / "rollouts.jsonl"
        open_run_files(root, (self.metrics, self.rollouts), start)
        self.states = RunStates(root / "checkpoints" / "state")

    def append(self, path: Path, line: str) -> None:
        with path.open("a") as f:
            f.write(line + "\n")


class Orchestrator:
    """Owns the loop: rollouts against the server, samples, a training step, weight sync."""

    def __init__(self, config: RunConfig, run_dir: Path, console: Console, start: RunStart = "new") -> None:
        self.config, self.console = config, console
        self.run = RunDir(run_dir, start)
        self.resumed = self.run.states.latest() if start == "resume" else None  # before the model: fail fast
        if self.resumed is not None:
            self.resumed.check_fits(config)
        self.run.states.clear_pending()
        self.plan = self.run.states.plan(config, self.resumed)  # where and when the trainer saves its state
        self.start_step = self.plan.start_step
        self.draws: dict[int, DrawState] = {}  # step -> where the draws stood after its rollouts
        (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
        self.env = run_environment(config)
        self.data_positions: dict[int, dict] = {}  # step -> the env's data position after that step's draws
        vocabulary = vocabulary_of(self.env)
        torch.manual_seed(config.seed)
        loaded = build_policy(config, vocabulary)
        self.model_dir, self.family = loaded.path, loaded.family
        self.tokenizer, self.policy = loaded.tokenizer, loaded.model
        self.spec, self.processor = loaded.spec, loaded.processor
        self.device = pick_device(config)
        self.store = ImageStore(config.store or run_dir / "store")
        self.renderer = create_renderer(self.tokenizer, self.family, spec=self.spec)
        # A server in another process (inference.url, or the run's child): nothing to serve here; its counters
        # are read over HTTP once it answers (inference_server).
        self.served = self.local_served() if config.inference.mode == "in_process" else None
        self.engine: Any = self.served.engine if self.served else None
        self.rng = random.Random(config.seed)
        if self.resumed is not None:
            self.resumed.draws.restore(self.rng, self.env)
        self.loggers = Loggers.open(config.log, run_dir, config.model_dump())
        self.agents: AgentHost | None = None  # the interception server, when the environment is agent code

    def hosting_agents(self, inference_url: str) -> contextlib.AbstractContextManager[AgentHost | None]:
        """The interception server for an agent environment (its sessions feed ``collect``); else nothing."""
        if not is_agent(self.env):
            return contextlib.nullcontext()
        return host_agents(self.renderer, self.store, inference_url, self.config.model.path or f"tiny-{self.family}", self.config.inference.host,
                           self.config.rollout.concurrency)

    def local_served(self) -> ServedModel:
        """A copy of the policy behind the transformers engine, for the in-process server."""
        # Trainer ranks start from the model directory, so the served model is the only copy here;
        # in process the trainer trains self.policy while the engine samples from its own copy.
        serve_model = copy.deepcopy(self.policy) if self.config.train.nproc == 0 else self.policy
        if self.resumed is not None:  # the server samples from the restored weights, as weight version N
            load_model_weights(serve_model, self.resumed.path)
        engine = TransformersEngine(serve_model, image_token_ids_of(self.policy), self.renderer.stop_token_ids,
                                    pad_token_id=self.renderer.stop_token_ids[0], device=self.device,
                                    weight_version=self.start_step, dtype=self.serve_dtype(),
                                    max_model_len=self.config.inference.max_model_len)
        return ServedModel(self.config.model.path or f"tiny-{self.family}", self.family, self.spec, self.processor,
                           engine, self.renderer.image_pad_id)

    @contextlib.contextmanager
    def inference_server(self, weight_version: int = 0) -> Iterator[str]:
        """The base URL rollouts call (``inference.mode``: this process's server, the run's child, or ``url``).

        A server in another process starts from the model directory's weights (``weight_version``:
        what it must report); a resumed run pushes it the restored ones first, as ``start_step``.
        """
        with rollout_server(self.served, self.store, self.config.inference, self.expected_model(weight_version),
                            self.child_server) as url:
            if self.served is None:
                self.engine = RemoteEngineCounters(url)
                if self.resumed is not None:
                    self.push_restored_weights(url)
            yield url

    def push_restored_weights(self, url: str) -> None:
        """Give the server at ``url`` the resumed state's weights, as weight version ``start_step``."""
        restored = copy.deepcopy(self.policy)
        load_model_weights(restored, self.resumed.path)
        post_checkpoint(self.checkpoints / "latest", self.family, url)(restored, self.start_step)

    def child_server(self) -> ServeProcess:
        """``mmref serve`` of this run's model directory and store, serving in the trainer's dtype by default."""
        return child_server(self.model_dir, self.store.url, self.run.root, self.config.inference, self.config.model,
                            self.device, str(self.serve_dtype()).removeprefix("torch."))

    def serve_dtype(self) -> torch.dtype:
        """The inference engine's dtype: ``inference.dtype``, else the trainer's (``train.dtype`` on this device)."""
        return resolve_dtype(self.config.inference.dtype or self.config.train.dtype, self.device)

    @property
    def checkpoints(self) -> Path:
        """Absolute: a server in another process and trainer nodes read these paths (a shared filesystem)."""
        return self.run.root.resolve() / "checkpoints"

    def expected_model(self, weight_version: int = 0) -> ExpectedModel:
        """What a remote server must serve: this run's model directory, fresh (``weight_version``: a step export's
        own), on the configured engine."""
        return ExpectedModel(self.spec.fingerprint, model_identity(self.model_dir), self.config.inference.engine,
                             weight_version)

    def make_trainer(self, inference_url: str) -> RLTrainer:
        """Torchrun ranks (``train.nproc`` of them) starting from the served weights, or this process."""
        config, checkpoints = self.config, self.checkpoints
        if config.train.nproc == 0:
            model = prepare_model(self.policy, config.train, self.device)  # dtype, checkpointing, frozen vision
            trainer = PolicyTrainer(model, store=self.store, spec=self.spec, processor=self.processor,
                                    config=config.train, image_token_ids=image_token_ids_of(self.policy),
                                    total_steps=config.max_steps,
                                    reference=frozen_copy(self.policy) if config.train.kl_coef > 0 else None)
            restore_trainer(trainer, self.plan)
            publish = (self.served.engine.load_from if self.served is not None  # tensors, no file
                       else post_checkpoint(checkpoints / "latest", self.family, inference_url))
            return InProcessTrainer(trainer, publish, exports=self.step_exports(trainer.model), state=self.plan)
        timeout = config.train.rank_timeout_s
        if config.train.launch == "external":
            self.console.print(f"waiting up to {timeout:.0f}s for {config.train.nproc} trainer rank(s): on each trainer "
                               f"node run `mmref train {self.run.root.resolve() / 'trainer-job.json'} --nnodes N "
                               "--node-rank R --nproc-per-node P --master-addr HOST`")
        job = DistributedJob(
            family=self.family, store_root=str(self.store.root), pub_address="", ready_address="",
            steps=config.max_steps, min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels,
            model_path=str(self.model_dir), checkpoint_dir=str(checkpoints / "latest"), inference_url=inference_url,
            device=config.device, ready_timeout_s=timeout, recv_timeout_s=timeout, collective_timeout_s=timeout,
            train=config.train, state=self.plan)
        return TorchrunTrainer(job, config.train.nproc, self.run.root.resolve(), timeout,
                               threads=self.threads_per_role()[1],
                               exports=self.step_exports(self.served.engine.model if self.served else self.policy),
                               transport=config.train.transport, launch=config.train.launch)

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
        ids = [f"s{step}-p{prompt}" for prompt in range(len(seeds))]
        if self.agents is not None:  # the agents reach the server through the host (evals of agents count here too)
            client = self.agents.client
        sent, requests, engine = client.bytes_sent, client.requests, self.engine
        clock, generated, batches, start = RolloutClock(), engine.generate_s, engine.batches, time.perf_counter()
        if self.agents is not None:  # agent code against its own session URL; requests go through the host
            batch, dropped = await play_agent_groups(self.env, seeds, ids, cfg.group_size, self.agents,
                                                     cfg.concurrency, agent_sampling(self.config)), []
        else:
            batch, dropped = await self.play_episodes(client, step, seeds, ids, clock)
        self.draws[step] = DrawState.capture(self.rng, self.env)
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

    async def play_episodes(self, client: TrainClient, step: int, seeds: list[int], ids: list[str],
                            clock: RolloutClock) -> tuple[GroupBatch, list[DroppedGroup]]:
        """The environment's episodes of ``seeds``, ``group_size`` each, and the groups whose episode failed."""
        cfg = self.config.rollout
        # One reset per group, deep-copied per member: plays what group_size same-seed episodes would.
        groups, played, dropped = [], [], []
        for seed, group_id in zip(seeds, ids):
            try:
                groups.append(ResetCopies(self.env.episode(seed), cfg.group_size))
                played.append(group_id)
            except EnvFailedError as exc:
                dropped.append(DroppedGroup(group_id, cfg.group_size, exc))
        if hasattr(self.env, "state_dict"):
            self.data_positions[step] = self.env.state_dict()
        sampling = run_sampling(self.config)
        # A group's members open alike (same seed): turn one is one n=group_size request per group.
        batch = await play_groups(groups, self.renderer, client, self.store, sampling, concurrency=cfg.concurrency,
                                  group_ids=played, clock=clock)
        return batch, dropped

    def save_state(self, steps_done: int) -> None:
        """Commit the trainer's state of ``steps_done`` (when due) with where this step's draws stood."""
        draws = self.draws.pop(steps_done - 1)
        for step in [s for s in self.draws if s < steps_done]:
            del self.draws[step]
        if self.plan.due(steps_done):
            self.run.states.commit(steps_done, self.config, draws)

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
        return await evaluate(self.env, self.config, self.renderer, client, self.store, weight_version, self.agents)

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


async def train_loop(orch: Orchestrator, base_url: str, progress: Progress, task: Any) -> list[StepRecord]:
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


async def _steps(orch: Orchestrator, trainer: RLTrainer, base_url: str, progress: Progress,
                 task: Any) -> list[StepRecord]:
    config = orch.config
    history = []
    # Evaluation has its own client: the steps' request counters stay the rollouts' own.
    async with TrainClient(base_url, batch=True) as client, TrainClient(base_url, batch=True) as eval_client:
        first = orch.start_step  # 0, or the steps a resumed run had done
        evals = [await orch.evaluate(eval_client, 0)] if config.eval.before_training and first == 0 else []
        pending = asyncio.create_task(orch.collect(client, first))
        for step in range(first, config.max_steps):
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
            pack_s, mark, loaded = time.perf_counter() - mark, time.perf_counter(), orch.engine.load_s
            step_metrics = await trainer.step(step, rows)  # returns once the server has the new weights
            trainer_s, weight_load_s = time.perf_counter() - mark, orch.engine.load_s - loaded
            train_s = time.perf_counter() - start - rollout_s
            if config.max_async == 0 and step + 1 < config.max_steps:
                pending = asyncio.create_task(orch.collect(client, step + 1))
            versions = [n.weight_version or 0 for t in traces for n in t.nodes]
            lag = step - min(versions)  # weight version v = after v steps; this step trains version `step`
            rewards = [t.reward for t in traces]
            tokens = sum(len(n.completion_ids) for t in traces for n in t.nodes)
            wall = time.perf_counter() - start
            dropped = rollout_times.pop("dropped")
            if orch.eval_due(step):
                evals.append(await orch.evaluate(eval_client, step + 1))
            record = StepRecord(
                step=step, reward_mean=sum(rewards) / len(rewards), reward_by_turn=reward_by_turn(traces),
                rollouts=len(traces), rollouts_dropped=dropped, samples=len(samples), rows=len(rows),
                occupancy=occupancy(rows, config.train.max_seq_len), tokens_per_s=tokens / wall,
                images_per_s=sum(len(t.nodes) for t in traces) / wall, rollout_s=rollout_s, train_s=train_s,
                step_s=wall, rollout_times=rollout_times, samples_s=samples_s, pack_s=pack_s, trainer_s=trainer_s,
                weight_load_s=weight_load_s, request_bytes=request_bytes,
                pixel_values_bytes=pixel_values_nbytes(rows, orch.spec), off_policy_lag=lag, trainer=step_metrics,
                evals=[e.as_dict() for e in evals])
            orch.record(step, traces, record.as_dict(), evals)
            orch.save_state(step + 1)
            evals = []
            history.append(record)
            progress.update(task, advance=1, description=f"step {step + 1}/{config.max_steps} reward "
                                                         f"{record.reward_mean:.2f} tok/s {record.tokens_per_s:.0f}")
    return history
