"""Where ``mmref rl`` trains: torchrun ranks fed over ZMQ (``train.nproc >= 1``) or its own process (0).

Both take a step's packed rows and return once the inference server serves the new weights::

    trainer = TorchrunTrainer(job, nproc=2, run_dir=run_dir)
    await trainer.start()                       # spawn torchrun, wait until every rank is READY
    metrics = await trainer.step(step, rows)    # deal micro-batches (refs) -> ranks train -> rank 0
                                                # writes train-dtype shards, POSTs /update_weights
    await trainer.close(ok=True)

In process (``InProcessTrainer``) the engine's model takes the trained tensors instead, no file.
Both report ``sync_s``, ``sync_bytes`` and ``sync_s_per_gb`` per step.

A rank that fails ends the torchrun job (fail-fast inside it); the orchestrator sees the job
exit and raises ``TrainerJobError`` with the tail of ``trainer.log``. On any error or
Ctrl-C, ``close(ok=False)`` ends the job's whole process group.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import IO, Protocol


from mmref.trainer.checkpoint import sync_record
from mmref.trainer.errors import TrainerJobError
from mmref.trainer.export import StepExports
from mmref.trainer.inference.engine import TransformersEngine
from mmref.trainer.inference.threaded import free_port
from mmref.trainer.launch import LaunchConfig, end_group, spawn
from mmref.trainer.pack import MicroBatch, PackedRow, split_by_tokens
from mmref.trainer.step import PolicyTrainer
from mmref.trainer.train import DistributedJob, zero_loss_pad
from mmref.trainer.transport import TransportAddresses, TransportLimits, ZmqSender, deal

_POLL_S = 0.005  # rank 0's metrics line: a step is ~0.1-3 s, and each poll is one small file read


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


class RLTrainer(Protocol):
    """What the orchestrator drives: one optimizer step per call, weights served when it returns."""

    async def start(self) -> None: ...
    async def step(self, step: int, rows: list[PackedRow]) -> dict: ...
    async def close(self, ok: bool) -> None: ...


class InProcessTrainer:
    """One rank inside the orchestrator's process: step, then hand the weights to the engine (no file)."""

    def __init__(self, trainer: PolicyTrainer, engine: TransformersEngine, exports: StepExports | None = None) -> None:
        self.trainer, self.engine, self.exports = trainer, engine, exports

    async def start(self) -> None:
        return None

    async def step(self, step: int, rows: list[PackedRow]) -> dict:
        metrics = await asyncio.to_thread(self.trainer.step, [MicroBatch(step, rows)])
        start = time.perf_counter()
        nbytes = await asyncio.to_thread(self.engine.load_from, self.trainer.model, step + 1)
        sync = sync_record(time.perf_counter() - start, nbytes)
        if self.exports is not None:
            await asyncio.to_thread(self.exports.after_step, step + 1)
        return {"ranks": 1, "transport_bytes": 0, "transport_s": 0.0, **sync, **metrics.as_dict()}

    async def close(self, ok: bool) -> None:
        return None


class TorchrunTrainer:
    """``nproc`` torchrun ranks running ``mmref.trainer.train`` on ``job``; micro-batches go over ZMQ."""

    def __init__(self, job: DistributedJob, nproc: int, run_dir: Path, timeout_s: float,
                 threads: int | None = None, exports: StepExports | None = None) -> None:
        addresses = TransportAddresses.loopback(free_port(), free_port())
        self.job = job.model_copy(update={"pub_address": addresses.pub, "ready_address": addresses.ready,
                                          "metrics_path": str(run_dir / "trainer.jsonl")})
        self.nproc, self.run_dir, self.timeout_s = nproc, run_dir, timeout_s
        self.threads = threads  # OMP_NUM_THREADS of each rank (None: torchrun's default)
        self.exports = exports  # fed from the weights rank 0 writes for the server (job.checkpoint_dir)
        self.metrics_path = Path(self.job.metrics_path)
        self.log_path = run_dir / "trainer.log"
        self.sender = ZmqSender(addresses, nproc, TransportLimits(recv_timeout_s=timeout_s))
        self._proc = None
        self._log: IO[str] | None = None

    async def start(self) -> None:
        """Spawn torchrun and wait until every rank has connected (or the job died, or ``timeout_s``)."""
        job_path = self.run_dir / "trainer-job.json"
        job_path.write_text(self.job.model_dump_json(indent=2))
        self.metrics_path.write_text("")
        self._log = self.log_path.open("w")
        env = {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}
        config = LaunchConfig(nproc_per_node=self.nproc, master_port=free_port(), timeout_s=self.timeout_s, env=env)
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
        micro_batches = [MicroBatch(step, group) for group in split_by_tokens(rows, self.nproc) if group]
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
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for line in self.metrics_path.read_text().splitlines():
                record = json.loads(line)
                if record["step"] == step:
                    record.pop("step")
                    record.pop("weight_version")
                    return record
            self._check_alive(f"step {step}")
            await asyncio.sleep(_POLL_S)
        raise TrainerJobError(f"trainer ranks did not finish step {step} within {self.timeout_s:.0f}s"
                              f"{self._log_tail()}")

    def _check_alive(self, stage: str) -> None:
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
