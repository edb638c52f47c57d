"""Per-rank training entry point, run under torchrun: receive, materialize, step, sync weights.

    torchrun --nproc-per-node 2 -m mmref.trainer.train job.json    # or: mmref train job.json

Each step, every rank: receives its micro-batches (refs only) over the transport, checks with
the other ranks (``fail_fast``), checks every row's slots against its token ids and
materializes the step's pixels once from its own store, checks again, runs forward/backward
(FSDP2 reduces gradients), and rank 0 writes the weights for the inference server, gathering one parameter at a time. A failure anywhere ends every rank with the failing rank's cause.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.distributed as dist

from mmref.renderers import ImageStore
from mmref.renderers.layout import LayoutSpec, layout_spec
from mmref.trainer.checkpoint import checkpoint_nbytes, save_checkpoint, sync_record
from mmref.trainer.distributed import RankInfo, fail_fast, init_distributed, shutdown_distributed, wrap_data_parallel
from mmref.trainer.materialize import Materializer
from mmref.trainer.job import DistributedJob
from mmref.trainer.models import build_image_processor, build_tiny_model, image_token_ids_of
from mmref.trainer.pack import MicroBatch
from mmref.trainer.policy import load_policy
from mmref.trainer.precision import prepare_model, resolve_dtype
from mmref.trainer.resume import restore_trainer, save_trainer_if_due
from mmref.trainer.step import PolicyTrainer, StepMetrics, frozen_copy
from mmref.trainer.transport import TransportAddresses, TransportLimits, ZmqReceiver


def run(job: DistributedJob) -> None:
    """Train ``job.steps`` steps on this rank; raises (on every rank) if any rank fails."""
    backend = {"auto": None, "cpu": "gloo", "cuda": "nccl"}[job.device]
    info = init_distributed(timeout_s=job.collective_timeout_s, backend=backend)
    try:
        _train(job, info)
    finally:
        shutdown_distributed()


def _train(job: DistributedJob, info: RankInfo) -> None:
    family, model, processor, spec = _build_model(job)
    store = ImageStore(job.store_root)
    image_token_ids = image_token_ids_of(model)
    dtype = resolve_dtype(job.train.dtype, info.device)
    model = prepare_model(model, job.train, info.device, sharded=info.world_size > 1)
    reference = frozen_copy(model).to(dtype) if job.train.kl_coef > 0 else None  # unsharded: a full copy per rank
    model, strategy = wrap_data_parallel(model, info, param_dtype=dtype)
    materializer = Materializer(store, spec, processor, device=info.device,
                                missing_image_policy=job.train.missing_image_policy)
    trainer = PolicyTrainer(model, store=store, spec=spec, processor=processor, config=job.train,
                            image_token_ids=image_token_ids, materializer=materializer, total_steps=job.steps,
                            reference=reference)
    with fail_fast("resume"):
        start = restore_trainer(trainer, job.state)  # 0 unless the job resumes a saved state
    limits = TransportLimits(ready_timeout_s=job.ready_timeout_s, recv_timeout_s=job.recv_timeout_s)
    receiver = ZmqReceiver(TransportAddresses(pub=job.pub_address, ready=job.ready_address), info.rank, limits)
    report: list[dict] = []
    try:
        for step in range(start, job.steps):
            with fail_fast(f"step {step} receive"):
                micro_batches = [MicroBatch.from_wire(mb) for mb in receiver.recv_step(step)]
            with fail_fast(f"step {step} check and materialize"):
                prepared = trainer.prepare(micro_batches)
            metrics = trainer.step(prepared, normalizer=_global_normalizer(micro_batches, info))
            version = step + 1
            with fail_fast(f"step {step} weight sync"):
                sync = _sync_weights(job, info, model, family, version, dtype)
            with fail_fast(f"step {step} state"):  # written before the result that tells the orchestrator
                save_trainer_if_due(trainer, job.state, version)
            _report_result(job, info, receiver, step, version, metrics, sync)
            if job.report_dir:  # test instrumentation: full gradients are a collective and costly
                report.append({"step": step, "weight_version": version, "strategy": strategy,
                               "bytes_received": receiver.bytes_received,
                               "images_materialized": materializer.stats.images_processed,
                               "token_ids": [row.token_ids for mb in micro_batches for row in mb.rows],
                               "metrics": metrics.as_dict(), "grads": _full_grads(model)})
    finally:
        receiver.close()
        materializer.close()
        if job.report_dir:
            Path(job.report_dir, f"rank{info.rank}.json").write_text(json.dumps(report))


def _build_model(job: DistributedJob) -> tuple[str, torch.nn.Module, Any, LayoutSpec]:
    """(family, model, image processor, layout spec): the job's model directory, or a tiny model of ``family``."""
    if job.model_path is not None:
        policy = load_policy(job.model_path, min_pixels=job.min_pixels, max_pixels=job.max_pixels)
        return policy.family, policy.model, policy.processor, policy.spec
    overrides = {k: v for k, v in (("min_pixels", job.min_pixels), ("max_pixels", job.max_pixels)) if v}
    spec = layout_spec(job.family, **overrides)
    return job.family, build_tiny_model(job.family, seed=job.seed), build_image_processor(spec), spec


def _report_result(job: DistributedJob, info: RankInfo, receiver: ZmqReceiver, step: int, version: int,
                   metrics: StepMetrics, sync: dict[str, float]) -> None:
    """Rank 0 sends the step's metrics, combined over ranks, and its weight sync's back over the transport
    (a collective).

    Also appended to ``job.metrics_path`` when set: a record of the ranks' steps, which nothing polls.
    """
    parts = [metrics]
    if info.world_size > 1:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, metrics)
    if info.rank == 0:
        line = {"step": step, "weight_version": version, "ranks": info.world_size, **sync,
                **StepMetrics.combine(parts).as_dict()}
        receiver.send_result(step, line)
        if job.metrics_path:
            with open(job.metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")


def _global_normalizer(micro_batches: list[MicroBatch], info: RankInfo) -> float:
    """Per-rank loss divisor so the rank-averaged gradient equals the single-process token mean.

    FSDP2/DDP average gradients over ranks (divide by W), so each rank divides its loss sum by
    global_tokens / W: then mean_r(sum_r / (N / W)) = sum / N.
    """
    tokens = torch.tensor([sum(mb.num_loss_tokens for mb in micro_batches)], dtype=torch.int64, device=info.device)
    if info.world_size > 1:
        dist.all_reduce(tokens)
    return max(1, int(tokens.item())) / info.world_size


def _full_grads(model: torch.nn.Module) -> dict[str, list[float]] | None:
    """Unsharded gradients (every rank must call: gathering a DTensor is a collective)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name] = grad.detach().float().flatten().tolist()
    return grads


def _sync_weights(job: DistributedJob, info: RankInfo, model: torch.nn.Module, family: str, version: int,
                  dtype: torch.dtype) -> dict[str, float]:
    """Rank 0 writes the weights (``weight_version``, in the train dtype) and tells the inference server to
    load them; its ``sync_record`` ({} without ``checkpoint_dir``; zeros on other ranks).

    Every rank takes part: each sharded parameter is gathered in turn and rank 0 writes shards as it goes.
    """
    if not job.checkpoint_dir:
        return {}
    start = time.perf_counter()
    path = save_checkpoint(model, job.checkpoint_dir, family, weight_version=version, dtype=dtype,
                           write=info.rank == 0)
    if path is None:
        return sync_record(0.0, 0)
    if job.inference_url:
        response = httpx.post(f"{job.inference_url.rstrip('/')}/update_weights", json={"path": str(path)}, timeout=60.0)
        if response.status_code != 200:
            raise RuntimeError(f"inference server refused weight version {version} from {path}: "
                               f"HTTP {response.status_code} {response.text[:500]}")
    return sync_record(time.perf_counter() - start, checkpoint_nbytes(path))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mmref.trainer.train JOB.json", file=sys.stderr)
        return 2
    run(DistributedJob.model_validate_json(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
