"""Where ``mmref rl`` trains: torchrun ranks fed over ZMQ (``train.nproc >= 1``) or its own process (0).

Both take a step's packed rows and return once the inference server serves the new weights::

    trainer = TorchrunTrainer(job, nproc=2, run_dir=run_dir)
    await trainer.start()                       # spawn torchrun, wait until every rank is READY
    metrics = await trainer.step(step, rows)    # deal micro-batches (refs) -> ranks train -> rank 0
                                                # writes train-dtype shards, POSTs /update_weights and
                                                # sends its metrics back over the transport
    await trainer.close(ok=True)

In process (``InProcessTrainer``) the engine's model takes the trained tensors instead, no file.
Both report ``sync_s``, ``sync_bytes`` and ``sync_s_per_gb`` per step.

A rank that fails ends the torchrun job (fail-fast inside it); the orchestrator sees the job
exit and raises ``TrainerJobError`` with the tail of ``trainer.log``. On any error or
Ctrl-C, ``close(ok=False)`` ends the job's whole process group.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

import httpx
import torch

from mmref.trainer.checkpoint import checkpoint_nbytes, save_checkpoint, sync_record
from mmref.trainer.errors import ReceiveTimeoutError, TrainerJobError
from mmref.trainer.export import StepExports
from mmref.trainer.inference.threaded import free_port
from mmref.trainer.job import DistributedJob, equal_row_counts, zero_loss_pad
from mmref.trainer.launch import LaunchConfig, end_group, spawn
from mmref.trainer.pack import MicroBatch, PackedRow, split_by_tokens
from mmref.trainer.resume import StatePlan, save_trainer_if_due
from mmref.trainer.run_config import TransportConfig
from mmref.trainer.step import PolicyTrainer
from mmref.trainer.transport import TransportEndpoints, TransportLimits, ZmqSender, deal

# A wait for rank 0's result returns as soon as it arrives; between slices the job is checked for a dead rank.
_RESULT_SLICE_S = 0.2


def cpu_threads_per_role(cpus: int, nproc: int, overlapped: bool) -> tuple[int, int]:
    """Intra-op threads of (the sampling process, each of ``nproc`` trainer ranks) on a CPU-only machine.

    Sampling and training one after the other (``max_async = 0``) each get every core. When
    they overlap (``max_async >= 1``) they split the cores: on 2 cores, two 2-thread pools
    fighting swelled the trainer's forward + backward 2.7x.

        >>> cpu_threads_per_role(2, 1, overlapped=True)
        (1, 1)
    """
    if not overlapped:
        return cpus, max(1, cpus // nproc)
    sampler = max(1, cpus // 2)
    return sampler, max(1, (cpus - sampler) // nproc)


def transport_endpoints(config: TransportConfig) -> TransportEndpoints:
    """The configured bind and connect addresses; a port of 0 becomes a free one on ``bind_host``."""
    pub = config.pub_port or free_port(config.bind_host)
    ready = config.ready_port or free_port(config.bind_host)
    return TransportEndpoints.of(config.bind_host, config.connect_host, pub, ready)


class RLTrainer(Protocol):
    """What the orchestrator drives: one optimizer step per call, weights served when it returns."""

    async def start(self) -> None: ...
    async def step(self, step: int, rows: list[PackedRow]) -> dict: ...
    async def close(self, ok: bool) -> None: ...


def post_checkpoint(directory: Path, family: str, inference_url: str) -> Callable[[torch.nn.Module, int], int]:
    """A ``publish`` for a server in another process: write the weights to ``directory`` (a path it can read),
    POST ``/update_weights``; returns the bytes written."""
    def publish(model: torch.nn.Module, version: int) -> int:
        path = save_checkpoint(model, directory, family, weight_version=version)
        httpx.post(f"{inference_url.rstrip('/')}/update_weights", json={"path": str(path)}, timeout=120).raise_for_status()
        return checkpoint_nbytes(path)
    return publish


class InProcessTrainer:
    """One rank inside the orchestrator's process: step, then ``publish`` the weights (the in-process engine
    takes the tensors, no file; a remote server gets a checkpoint and a POST: ``post_checkpoint``); its
    resumable state when ``state`` says one is due."""

    def __init__(self, trainer: PolicyTrainer, publish: Callable[[torch.nn.Module, int], int],
                 exports: StepExports | None = None, state: StatePlan | None = None) -> None:
        self.trainer, self.publish, self.exports, self.state = trainer, publish, exports, state

    async def start(self) -> None:
        return None

    async def step(self, step: int, rows: list[PackedRow]) -> dict:
        metrics = await asyncio.to_thread(self.trainer.step, [MicroBatch(step, rows)])
        await asyncio.to_thread(save_trainer_if_due, self.trainer, self.state, step + 1)
        start = time.perf_counter()
        nbytes = await asyncio.to_thread(self.publish, self.trainer.model, step + 1)
        sync = sync_record(time.perf_counter() - start, nbytes)
        if self.exports is not None:
            await asyncio.to_thread(self.exports.after_step, step + 1)
        return {"ranks": 1, "transport_bytes": 0, "transport_s": 0.0, **sync, **metrics.as_dict()}

    async def close(self, ok: bool) -> None:
        return None


class TorchrunTrainer:
    """``nproc`` torchrun ranks running ``mmref.trainer.train`` on ``job``; micro-batches go over ZMQ."""

    def __init__(self, job: DistributedJob, nproc: int, run_dir: Path, timeout_s: float,
                 threads: int | None = None, exports: StepExports | None = None,
                 transport: TransportConfig = TransportConfig(), launch: str = "local") -> None:
        endpoints = transport_endpoints(transport)
        self.job = job.model_copy(update={"pub_address": endpoints.connect.pub,
                                          "ready_address": endpoints.connect.ready,
                                          "metrics_path": str(run_dir / "trainer.jsonl")})
        self.nproc, self.run_dir, self.timeout_s, self.launch = nproc, run_dir, timeout_s, launch
        self.threads = threads  # OMP_NUM_THREADS of each rank (None: torchrun's default)
        self.exports = exports  # fed from the weights rank 0 writes for the server (job.checkpoint_dir)
        self.metrics_path = Path(self.job.metrics_path)
        self.log_path = run_dir / "trainer.log"
        self.sender = ZmqSender(endpoints.bind, nproc, TransportLimits(recv_timeout_s=timeout_s))
        self._proc = None
        self._log: IO[str] | None = None

    async def start(self) -> None:
        """Spawn torchrun and wait until every rank has connected (or the job died, or ``timeout_s``)."""
        job_path = self.run_dir / "trainer-job.json"
        job_path.write_text(self.job.model_dump_json(indent=2))
        self.metrics_path.write_text("")
        self._log = self.log_path.open("w")
        if self.launch == "local":  # "external": `mmref train JOB` runs on the trainer nodes
            env = {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}
            config = LaunchConfig(nproc_per_node=self.nproc, master_port=free_port(), timeout_s=self.timeout_s,
                                  env=env)
            self._proc = spawn(["-m", "mmref.trainer.train", str(job_path)], config, self._log)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                await asyncio.to_thread(self.sender.wait_ready, 0.2)  # short slices: check the job between
                return
            except TimeoutError as exc:
                self._check_alive("starting")
                if time.monotonic() > deadline:
                    raise TrainerJobError(f"trainer ranks not ready after {self.timeout_s:.0f}s: {exc}"
                                          f"{self._log_tail()}") from None

    async def step(self, step: int, rows: list[PackedRow]) -> dict:
        """Deal ``rows`` to the ranks by token count, then wait for rank 0's metrics of ``step``."""
        if not rows:
            raise ValueError(f"step {step} has no rows to train on")
        groups = equal_row_counts([group for group in split_by_tokens(rows, self.nproc) if group])
        micro_batches = [MicroBatch(step, group) for group in groups]
        per_rank = deal([mb.to_wire() for mb in micro_batches], self.nproc,
                        lambda rank: zero_loss_pad(micro_batches[0]).to_wire())
        start = time.perf_counter()
        sent = await asyncio.to_thread(self.sender.send_step, step, per_rank)
        transport_s = time.perf_counter() - start
        metrics = await self._wait_for_metrics(step)
        if self.exports is not None:  # of the served model, which holds the weights rank 0 wrote for it
            await asyncio.to_thread(self.exports.after_step, step + 1)
        return {**metrics, "transport_bytes": sent, "transport_s": transport_s}

    async def _wait_for_metrics(self, step: int) -> dict:
        """Rank 0's result of ``step``, sent over the transport once the server has the step's weights."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:  # short slices: check the job between
                record = await asyncio.to_thread(self.sender.recv_result, step, _RESULT_SLICE_S)
            except ReceiveTimeoutError:
                self._check_alive(f"step {step}")
                continue
            record.pop("step")
            record.pop("weight_version")
            return record
        raise TrainerJobError(f"trainer ranks did not finish step {step} within {self.timeout_s:.0f}s"
                              f"{self._log_tail()}")

    def _check_alive(self, stage: str) -> None:
        if self._proc is None:  # external ranks: the ready and step timeouts bound the wait
            return
        code = self._proc.poll()
        if code is not None:
            raise TrainerJobError(f"trainer ranks exited with code {code} while {stage}{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        if self._log is not None:
            self._log.flush()
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:] if self.log_path.exists() else []
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(tail) if tail else ""

    async def close(self, ok: bool) -> None:
        """On success let the ranks finish (they exit after the last step); otherwise end the group now."""
        if self._proc is not None:
            if ok:
                try:
                    await asyncio.to_thread(self._proc.wait, 60)
                except Exception:
                    ok = False
            if not ok or self._proc.poll() is None:
                end_group(self._proc, grace_s=5)
            if ok and self._proc.returncode != 0:
                raise TrainerJobError(f"trainer ranks exited with code {self._proc.returncode}{self._log_tail()}")
        self.sender.close()
        if self._log is not None:
            self._log.close()
