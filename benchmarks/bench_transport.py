"""Micro-batch transport: ZMQ loopback throughput for ref micro-batches, and bytes per step with
refs vs the same step's processed pixel_values.

Prints one JSON line. Setup: 2 ranks (receiver threads) on tcp://127.0.0.1, 32 samples with
two 1280x720 screenshots each under the default qwen2-vl layout, packed into 4096-token rows.
Target: the step's processed pixel_values are >= 1000x the bytes the wire sends (refs plus the
compact per-token arrays). Also reported: the same step as plain msgpack lists, without the
compact codec.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration-tests"))

from mmref.renderers import ImageStore, layout_spec  # noqa: E402
from mmref.renderers.decode import decode_rgb  # noqa: E402
from mmref.trainer.models import build_image_processor  # noqa: E402
from mmref.trainer.pack import MicroBatch, pack  # noqa: E402
from mmref.trainer.transport import TransportAddresses, TransportLimits, ZmqReceiver, ZmqSender, deal  # noqa: E402

WORLD, SAMPLES, SIZE, STEPS = 2, 32, (1280, 720), 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> dict:
    import trainer_cases
    spec = layout_spec("qwen2-vl")
    trainer_cases.small_spec = lambda family: spec  # full-size layout, as a real run would use
    store = ImageStore(tempfile.mkdtemp(prefix="mmref-bench-transport-"))
    samples = [trainer_cases.make_sample(store, "qwen2-vl", 20, [(2 * i, SIZE), (2 * i + 1, SIZE)], 50, sampled=40,
                                         advantage=1.0, logprob=-1.0) for i in range(SAMPLES)]
    rows = pack(samples, 4096)
    micro_batches = [MicroBatch(0, [row]).to_wire() for row in rows]
    per_rank = deal(micro_batches, WORLD, lambda rank: MicroBatch(0, []).to_wire())
    plain_bytes = sum(len(msgpack.packb(list(batches), use_bin_type=True)) for batches in per_rank)

    # Baseline: the pixel_values this step would carry if the wire shipped processed pixels.
    processor = build_image_processor(spec)
    pixel_bytes = 0
    for row in rows:
        for slot in row.images:
            out = processor(images=[decode_rgb(store.read(slot.ref), slot.ref)], return_tensors="pt")
            pixel_bytes += out["pixel_values"].numel() * out["pixel_values"].element_size()

    addresses = TransportAddresses.loopback(_free_port(), _free_port())
    limits = TransportLimits(ready_timeout_s=10, recv_timeout_s=10, high_water_mark=STEPS + 1)
    sender = ZmqSender(addresses, WORLD, limits)
    receivers = [ZmqReceiver(addresses, r, limits) for r in range(WORLD)]
    sender.wait_ready()
    received = [0] * WORLD

    def consume(rank: int) -> None:
        for step in range(STEPS):
            received[rank] += len(receivers[rank].recv_step(step))

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(WORLD)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    ref_bytes_per_step = 0
    for step in range(STEPS):
        ref_bytes_per_step = sender.send_step(step, per_rank)
    for t in threads:
        t.join(timeout=60)
    elapsed = time.perf_counter() - start
    for rx in receivers:
        rx.close()
    sender.close()
    total_mb = sender.bytes_sent / 1e6
    return {
        "benchmark": "transport", "ranks": WORLD, "steps": STEPS, "rows_per_step": len(rows),
        "images_per_step": 2 * SAMPLES, "micro_batches_received": sum(received),
        "throughput_mb_s": round(total_mb / elapsed, 1),
        "micro_batches_per_s": round(sum(received) / elapsed, 1),
        "ref_bytes_per_step": ref_bytes_per_step, "pixel_values_bytes_per_step": pixel_bytes,
        "pixels_over_refs": round(pixel_bytes / ref_bytes_per_step, 1),
        "target_pixels_over_refs": 1000,
        "plain_msgpack_bytes_per_step": plain_bytes,
        "plain_over_compact": round(plain_bytes / ref_bytes_per_step, 2),
        "ok": pixel_bytes / ref_bytes_per_step >= 1000,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
