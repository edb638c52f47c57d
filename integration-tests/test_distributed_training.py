"""Two torchrun ranks on CPU fed over ZMQ: exact per-rank contents, gradients equal to one
process on the same data, pixels made on each rank from refs only; a missing image on rank 1
fails both ranks naming rank 1 and the asset."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import torch

from mmref.renderers import ImageStore
from mmref.trainer.checkpoint import load_weights_into, read_checkpoint_meta
from mmref.trainer.launch import LaunchConfig, LaunchResult, launch
from mmref.trainer.materialize import Materializer
from mmref.trainer.models import build_tiny_model
from mmref.trainer.pack import MicroBatch, pack
from mmref.trainer.run_config import TrainConfig
from mmref.trainer.step import PolicyTrainer
from mmref.trainer.train import DistributedJob, zero_loss_pad
from mmref.trainer.transport import TransportAddresses, TransportLimits, ZmqSender, deal
from trainer_cases import IMAGE_TOKENS, make_sample, processor, small_spec

FAMILY = "qwen2-vl"
MAX_PIXELS = 128 * 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _micro_batches(store: ImageStore) -> list[MicroBatch]:
    samples = [make_sample(store, FAMILY, 5 + i, [(i, (64 + 16 * i, 48))], 6, sampled=4, advantage=1.0 - i,
                           logprob=-2.0) for i in range(3)]
    return [MicroBatch(0, pack([sample], 64)) for sample in samples]  # one sample per micro-batch


def _pad(micro_batches: list[MicroBatch]):
    """Zero-loss copies keep a short rank's forward/backward (and FSDP collectives) in step."""
    return lambda rank: zero_loss_pad(micro_batches[0]).to_wire()


def _run_job(tmp_path, store: ImageStore, per_rank: list[list[dict]], **job_fields) -> tuple[LaunchResult, ZmqSender]:
    addresses = TransportAddresses.loopback(_free_port(), _free_port())
    job = DistributedJob(family=FAMILY, store_root=str(store.root), pub_address=addresses.pub,
                         ready_address=addresses.ready, steps=1, max_pixels=MAX_PIXELS, report_dir=str(tmp_path),
                         ready_timeout_s=60, recv_timeout_s=60, collective_timeout_s=60, **job_fields)
    path = tmp_path / "job.json"
    path.write_text(job.model_dump_json())
    sender = ZmqSender(addresses, world_size=2, limits=TransportLimits(ready_timeout_s=90))
    results: list[LaunchResult] = []
    thread = threading.Thread(target=lambda: results.append(launch(
        ["-m", "mmref.trainer.train", str(path)], LaunchConfig(nproc_per_node=2, master_port=_free_port(), timeout_s=150))))
    thread.start()
    try:
        sender.wait_ready()
        sender.send_step(0, per_rank)
        thread.join(timeout=170)
    finally:
        sender.close()
    return results[0], sender


@pytest.mark.timeout(240)
def test_two_ranks_receive_their_batches_and_match_single_process_gradients(tmp_path):
    store = ImageStore(tmp_path / "store")
    micro_batches = _micro_batches(store)
    per_rank = deal([mb.to_wire() for mb in micro_batches], 2, _pad(micro_batches))
    result, sender = _run_job(tmp_path, store, per_rank, checkpoint_dir=str(tmp_path / "weights"))
    assert result.returncode == 0, result.output
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in range(2):
        step = reports[rank][0]
        assert step["token_ids"] == [row["token_ids"] for mb in per_rank[rank] for row in mb["rows"]]
        assert step["strategy"] == "fsdp2"
        # each unique image decoded and processed once on this rank, from its ref
        assert step["images_materialized"] == len({s["ref"] for mb in per_rank[rank] for r in mb["rows"] for s in r["images"]})
    # Refs only on the wire: the whole step is smaller than one image's float32 pixel_values.
    one_image_pixels = 4 * 3 * 2 * 14 * 14 * micro_batches[0].rows[0].images[0].ref.num_tokens * 4
    assert sender.bytes_sent < one_image_pixels
    assert b"pixel_values" not in json.dumps(per_rank).encode()

    model = build_tiny_model(FAMILY, seed=0)
    spec = small_spec(FAMILY)
    trainer = PolicyTrainer(model, store=store, spec=spec, processor=processor(FAMILY), config=TrainConfig(),
                            image_token_ids=IMAGE_TOKENS, materializer=Materializer(store, spec, processor(FAMILY)))
    every = [MicroBatch.from_wire(mb) for batches in per_rank for mb in batches]
    trainer.step(every)
    grads = reports[0][0]["grads"]
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(torch.tensor(grads[name]), param.grad.flatten(), rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
    # Weight sync: rank 0 exported the full updated weights as version 1, equal to the single-process update.
    assert read_checkpoint_meta(tmp_path / "weights")["weight_version"] == 1
    exported = build_tiny_model(FAMILY, seed=1)
    load_weights_into(exported, tmp_path / "weights")
    for (name, mine), theirs in zip(model.state_dict().items(), exported.state_dict().values()):
        torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.timeout(240)
def test_missing_image_on_rank_1_fails_both_ranks_naming_rank_1_and_the_asset(tmp_path):
    store = ImageStore(tmp_path / "store")
    micro_batches = _micro_batches(store)[:2]
    lost = micro_batches[1].rows[0].images[0].ref  # dealt to rank 1
    (tmp_path / "store" / lost.asset).unlink()
    per_rank = deal([mb.to_wire() for mb in micro_batches], 2, _pad(micro_batches))
    result, _ = _run_job(tmp_path, store, per_rank)
    assert result.returncode != 0
    assert "materialize failed on rank 1: MissingImageError" in result.output, result.output
    assert lost.asset in result.output
    assert result.elapsed_s < 60  # start-up (~10 s of imports on 2 shared cores) + fail-fast, never a timeout
