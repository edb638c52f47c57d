"""Process group, data-parallel wrapping and the error-flag all-reduce that fails every rank.

Under torchrun each rank calls ``init_distributed()`` (gloo on CPU, NCCL on CUDA, with a
timeout on every collective), wraps its model with ``wrap_data_parallel`` (FSDP2
``fully_shard``; DDP only where sharding is unavailable) and runs each fallible stage inside
``fail_fast``::

    with fail_fast("materialize"):
        rows = materializer.materialize(batch.rows)

If any rank raised, every rank raises: the failing rank its own error, the others
``RankFailedError("failed on rank 1: MissingImageError: ...")``. Nobody is left waiting in
the next collective.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmref.trainer.errors import RankFailedError
from mmref.trainer.precision import shard_units


@dataclass(frozen=True)
class RankInfo:
    """Who this process is in the job (from torchrun's environment)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def init_distributed(timeout_s: float = 120.0, backend: str | None = None) -> RankInfo:
    """Join the torchrun process group; gloo on CPU, NCCL on CUDA; ``timeout_s`` bounds every collective.

    Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun): this is the entry point,
    the one place the environment is read. Without them it returns a 1-rank world.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    return RankInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=device)


def shutdown_distributed() -> None:
    """Leave the process group together: a barrier first, then destroy.

    Without the barrier a rank that destroys its gloo group while a peer is still tearing
    down aborts (``terminate called without an active exception``) in about half of runs.
    After a failure the barrier may itself fail (a peer is gone); that is not a new error.
    """
    if not dist.is_initialized():
        return
    with suppress(RuntimeError):  # DistBackendError / timeouts when a peer already died
        dist.barrier()
    dist.destroy_process_group()


def wrap_data_parallel(model: torch.nn.Module, info: RankInfo,
                       param_dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, str]:
    """Shard ``model`` with FSDP2 ``fully_shard`` (returns the same module, now sharded) and say how.

    Each of ``precision.shard_units`` (decoder layers, vision blocks) is sharded on its own,
    then the root: a layer's full weights exist only while it runs. Weights stay float32
    shards; ``param_dtype`` is what they are gathered in for compute, and gradients are
    reduced in float32. Falls back to DDP (in ``param_dtype``) only where ``fully_shard`` is
    unavailable or refuses the device; the strategy name ("fsdp2", "ddp", "single") is logged.
    """
    if info.world_size == 1:
        return model, "single"
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch builds without FSDP2
        fully_shard = None
    if fully_shard is not None:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        try:
            for unit in shard_units(model):
                fully_shard(unit, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            return model, "fsdp2"
        except (RuntimeError, NotImplementedError, ValueError):
            pass
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model.to(param_dtype), device_ids=ids), "ddp"


def check_all_ranks(error: BaseException | None, stage: str) -> None:
    """All-reduce an error flag; raise on every rank if any rank failed at ``stage``.

    The failing rank re-raises its own ``error``; every other rank raises ``RankFailedError``
    naming the lowest failing rank and its cause. One int all-reduce when nothing failed;
    the causes are gathered only on failure.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    if int(flag.item()) == 0:
        return
    causes: list[str | None] = [None] * dist.get_world_size()
    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(causes, mine)
    if error is not None:
        raise error
    failed = [(rank, cause) for rank, cause in enumerate(causes) if cause is not None]
    rank, cause = failed[0]
    others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
    raise RankFailedError(f"{stage} failed on rank {rank}: {cause}{others}")


@contextmanager
def fail_fast(stage: str) -> Iterator[None]:
    """Run a stage; afterwards every rank learns whether any rank failed in it (see ``check_all_ranks``)."""
    try:
        yield
    except Exception as exc:  # every failure must reach the other ranks, whatever its type
        check_all_ranks(exc, stage)
        raise
    check_all_ranks(None, stage)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
