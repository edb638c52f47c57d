"""Two torchrun ranks on CPU fed over ZMQ: exact per-rank contents, gradients equal to one
process on the same data, pixels made on each rank from refs only; a missing image on rank 1
fails both ranks naming rank 1 and the asset."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import replace
from typing import NamedTuple

import pytest
import torch

from mmref.renderers import ImageStore
from mmref.trainer.checkpoint import checkpoint_nbytes, load_weights_into, read_checkpoint_meta
from mmref.trainer.materialize import Materializer
from mmref.trainer.models import build_tiny_model
from mmref.trainer.pack import MicroBatch, pack
from mmref.trainer.run_config import TrainConfig
from mmref.trainer.step import PolicyTrainer
from mmref.trainer.job import DistributedJob, zero_loss_pad
from mmref.trainer.transport import TransportAddresses, TransportLimits, ZmqSender, deal
from trainer_cases import IMAGE_TOKENS, make_sample, processor, small_spec

FAMILY = "qwen2-vl"
MAX_PIXELS = 128 * 128


class Finished(NamedTuple):
    returncode: int
    output: str


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


def _run_job(tmp_path, store: ImageStore, per_rank: list[list[dict]], **job_fields) -> tuple[Finished, ZmqSender, float]:
    """``mmref train`` with 2 ranks, sent step 0; returns how it ended, the sender and the seconds from send to exit."""
    addresses = TransportAddresses.loopback(_free_port(), _free_port())
    job = DistributedJob(family=FAMILY, store_root=str(store.root), pub_address=addresses.pub,
                         ready_address=addresses.ready, steps=1, max_pixels=MAX_PIXELS, report_dir=str(tmp_path),
                         ready_timeout_s=60, recv_timeout_s=60, collective_timeout_s=60, **job_fields)
    path = tmp_path / "job.json"
    path.write_text(job.model_dump_json())
    sender = ZmqSender(addresses, world_size=2, limits=TransportLimits(ready_timeout_s=90))
    proc = subprocess.Popen([sys.executable, "-m", "mmref.trainer.cli", "train", str(path), "--nproc-per-node", "2",
                             "--master-port", str(_free_port()), "--timeout", "150"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sender.wait_ready()
        sender.send_step(0, per_rank)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=170)
        after_send = time.monotonic() - sent
    finally:
        sender.close()
        if proc.poll() is None:
            proc.kill()
    return Finished(proc.returncode, output), sender, after_send


@pytest.mark.timeout(240)
def test_two_ranks_receive_their_batches_and_match_single_process_gradients(tmp_path):
    """Sharded per decoder layer and vision block, with gradient checkpointing: still the single-process gradients."""
    store = ImageStore(tmp_path / "store")
    micro_batches = _micro_batches(store)
    per_rank = deal([mb.to_wire() for mb in micro_batches], 2, _pad(micro_batches))
    result, sender, _ = _run_job(tmp_path, store, per_rank, checkpoint_dir=str(tmp_path / "weights"),
                              metrics_path=str(tmp_path / "trainer.jsonl"),
                              train=TrainConfig(gradient_checkpointing=True))
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
    single = trainer.step(every)
    # Rank 0's metrics line combines both ranks' shares into the single-process figures.
    [combined] = [json.loads(line) for line in (tmp_path / "trainer.jsonl").read_text().splitlines()]
    assert (combined["step"], combined["weight_version"], combined["ranks"]) == (0, 1, 2)
    assert combined["sync_bytes"] == checkpoint_nbytes(tmp_path / "weights") > 0 and combined["sync_s_per_gb"] > 0
    assert combined["loss_tokens"] == single.loss_tokens
    for key in ("loss", "entropy", "clip_fraction", "grad_norm"):
        assert combined[key] == pytest.approx(getattr(single, key), rel=1e-4, abs=1e-6), key
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
    result, _, after_send = _run_job(tmp_path, store, per_rank)
    assert result.returncode != 0
    assert "check and materialize failed on rank 1: MissingImageError" in result.output, result.output
    assert lost.asset in result.output
    assert after_send < 30  # from the step's arrival to every rank gone: fail-fast, never a timeout


@pytest.mark.timeout(240)
def test_a_shifted_slot_on_rank_1_fails_both_ranks_before_the_vision_tower_naming_row_and_asset(tmp_path):
    store = ImageStore(tmp_path / "store")
    micro_batches = _micro_batches(store)[:2]
    row = micro_batches[1].rows[0]  # dealt to rank 1
    shifted = replace(row, images=[row.images[0].shifted(1)])
    micro_batches[1] = MicroBatch(0, [shifted])
    per_rank = deal([mb.to_wire() for mb in micro_batches], 2, _pad(micro_batches))
    result, _, after_send = _run_job(tmp_path, store, per_rank)
    assert result.returncode != 0
    assert ("check and materialize failed on rank 1: SlotError: step 0 micro-batch 0 row 0: image slot 0"
            in result.output), result.output
    assert row.images[0].ref.asset in result.output
    assert after_send < 30
