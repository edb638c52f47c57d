"""Memory of one training step and the cost of weight sync, on a mid-size random Qwen2-VL (CPU).

The model: hidden 1024, 8 decoder layers, the real 151,936-token vocabulary (tied embedding),
a 4-block vision tower: about 250M parameters. Each variant runs in a fresh interpreter:

- ``fp32``: float32 weights, AdamW; the minimum is 16 B/param (weights 4 + grads 4 + moments 8).
- ``bf16_gc``: ``train.dtype = "bfloat16"`` with gradient checkpointing; minimum 8 B/param.

Peak memory is the process's peak RSS (``VmHWM``, reset once the model is built) minus its RSS
before the model existed, over one step of a packed row of ~350 tokens with images. Weight
sync (bfloat16 weights) is timed per GB both ways mmref does it, against one plain file write
of the same bytes: the in-process handover (``copy_weights`` into the engine's model) and the
rank path (``save_checkpoint`` in shards, then ``load_weights_into`` the server's model).

Prints one JSON line. Targets: bf16 + checkpointing peaks at <= 0.6x fp32; the handover is
faster than the write floor; the rank path (write + read back) <= 4x the write floor.
"""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "integration-tests"))

SIZE = dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=8, intermediate_size=2816,
            vision_hidden=256, vision_depth=4, vision_heads=4)
MIN_BYTES_PER_PARAM = {"fp32": 16, "bf16_gc": 8}  # AdamW: weights + grads + 2 moments, in the weights' dtype


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _model(dtype):
    import torch

    from mmref.trainer.models import TinySize, build_tiny_model

    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy first
    try:
        return build_tiny_model("qwen2-vl", size=TinySize(**SIZE), dtype=dtype)
    finally:
        torch.set_default_dtype(torch.float32)


def step_variant(variant: str) -> dict:
    """One training step in this process; its peak memory above the model-less baseline."""
    import torch

    from mmref.renderers import ImageStore
    from mmref.trainer.materialize import Materializer
    from mmref.trainer.pack import MicroBatch, pack
    from mmref.trainer.precision import prepare_model
    from mmref.trainer.run_config import TrainConfig
    from mmref.trainer.step import PolicyTrainer
    from trainer_cases import IMAGE_TOKENS, make_sample, processor, small_spec

    torch.set_num_threads(2)
    store = ImageStore(tempfile.mkdtemp(prefix="mmref-bench-memory-"))
    samples = [make_sample(store, "qwen2-vl", 60, [(i, (96, 96))], 20, sampled=20, advantage=(-1.0) ** i,
                           logprob=-11.0) for i in range(4)]
    rows = pack(samples, 4096)
    config = TrainConfig(lr=1e-5, dtype="float32" if variant == "fp32" else "bfloat16",
                         gradient_checkpointing=variant == "bf16_gc")
    materializer = Materializer(store, small_spec("qwen2-vl"), processor("qwen2-vl"))
    prepared_rows = materializer.materialize(rows)  # pixels exist before the baseline
    del prepared_rows
    gc.collect()
    baseline_kb = _status_kb("VmRSS")
    model = prepare_model(_model(torch.float32 if variant == "fp32" else torch.bfloat16), config, "cpu")
    params = sum(p.numel() for p in model.parameters())
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    trainer = PolicyTrainer(model, store=store, spec=small_spec("qwen2-vl"), processor=processor("qwen2-vl"),
                            config=config, image_token_ids=IMAGE_TOKENS, materializer=materializer)
    start = time.perf_counter()
    metrics = trainer.step([MicroBatch(0, rows)])
    step_s = time.perf_counter() - start
    peak = (_status_kb("VmHWM") - baseline_kb) * 1024
    return {"params": params, "tokens": sum(len(r) for r in rows), "peak_bytes": peak, "step_s": round(step_s, 2),
            "bytes_per_param": round(peak / params, 2), "min_bytes_per_param": MIN_BYTES_PER_PARAM[variant],
            "over_min": round(peak / params / MIN_BYTES_PER_PARAM[variant], 3), "loss_finite": metrics.loss == metrics.loss}


def sync_variant() -> dict:
    """Seconds per GB of bfloat16 weights: handover, shard write + read back, and one plain file write."""
    import torch

    from mmref.trainer.checkpoint import checkpoint_nbytes, copy_weights, load_weights_into, save_checkpoint

    torch.set_num_threads(2)
    trained = _model(torch.bfloat16)
    served = copy.deepcopy(trained)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1e-3)
    start = time.perf_counter()
    nbytes = copy_weights(trained, served)
    handover_s = time.perf_counter() - start
    directory = Path(tempfile.mkdtemp(prefix="mmref-bench-sync-"))
    payload = bytearray(nbytes)  # zero-filled, so touched: the floor writes resident memory, as the sync does
    floor_s = _plain_write(directory / "floor-0.bin", payload)
    start = time.perf_counter()
    path = save_checkpoint(trained, directory / "latest", "qwen2-vl", 1, dtype=torch.bfloat16)
    write_s = time.perf_counter() - start
    load_weights_into(served, path)
    file_s = time.perf_counter() - start
    written = checkpoint_nbytes(path)
    floor_s = min(floor_s, _plain_write(directory / "floor-1.bin", payload)) * written / nbytes  # best of two
    gb = written / 1e9
    return {"sync_bytes": written, "handover_bytes": nbytes,
            "handover_s_per_gb": round(handover_s / (nbytes / 1e9), 3), "write_s_per_gb": round(write_s / gb, 3),
            "file_sync_s_per_gb": round(file_s / gb, 3), "floor_write_s_per_gb": round(floor_s / gb, 3),
            "handover_over_floor": round(handover_s / (nbytes / 1e9) / (floor_s / gb), 3),
            "file_sync_over_floor": round(file_s / floor_s, 3)}


def _plain_write(path: Path, payload: bytearray) -> float:
    """Seconds of one ``write`` of ``payload`` to a new file (closed, not fsynced: as the sync writes)."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(payload)
    return time.perf_counter() - start


def _child(name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"bench_memory.py {name} failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> dict:
    fp32, bf16, sync = _child("fp32"), _child("bf16_gc"), _child("sync")
    result = {"benchmark": "memory", "params": fp32["params"], "fp32": fp32, "bf16_gc": bf16, "sync": sync,
              "bf16_gc_over_fp32_peak": round(bf16["peak_bytes"] / fp32["peak_bytes"], 3),
              "target_bf16_gc_over_fp32_peak": 0.6, "target_file_sync_over_floor": 4.0}
    result["ok"] = (result["bf16_gc_over_fp32_peak"] <= 0.6 and sync["handover_over_floor"] < 1.0
                    and sync["file_sync_over_floor"] <= 4.0 and fp32["loss_finite"] and bf16["loss_finite"])
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(sync_variant() if sys.argv[1] == "sync" else step_variant(sys.argv[1])))
    else:
        print(json.dumps(main()))
