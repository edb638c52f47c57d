"""Where mmref rl trains: per-role CPU threads and what a torchrun job is launched with."""

import asyncio

import pytest

from mmref.trainer import rl_trainer
from mmref.trainer.rl_trainer import TorchrunTrainer, cpu_threads_per_role
from mmref.trainer.job import DistributedJob


@pytest.mark.parametrize("cpus, nproc, overlapped, expected", [
    (2, 1, True, (1, 1)),     # sampling and training at once: one core each
    (16, 2, True, (8, 4)),    # half for sampling, the rest shared by the ranks
    (1, 1, True, (1, 1)),     # never zero threads
    (2, 1, False, (2, 2)),    # one after the other: both get every core
    (8, 4, False, (8, 2)),
])
def test_overlapped_roles_split_the_cores_and_sequential_roles_share_them(cpus, nproc, overlapped, expected):
    assert cpu_threads_per_role(cpus, nproc, overlapped) == expected


@pytest.mark.parametrize("threads, env", [(3, {"OMP_NUM_THREADS": "3"}), (None, {})])
def test_torchrun_ranks_are_launched_with_their_thread_count(tmp_path, monkeypatch, threads, env):
    launched = []

    def fake_spawn(args, config, output):
        launched.append(config)
        raise RuntimeError("not starting torchrun in a unit test")
    monkeypatch.setattr(rl_trainer, "spawn", fake_spawn)
    job = DistributedJob(family="qwen2-vl", store_root=str(tmp_path), pub_address="", ready_address="", steps=1)
    trainer = TorchrunTrainer(job, nproc=1, run_dir=tmp_path, timeout_s=5, threads=threads)
    with pytest.raises(RuntimeError, match="not starting"):
        asyncio.run(trainer.start())
    asyncio.run(trainer.close(ok=False))
    assert launched[0].env == env
