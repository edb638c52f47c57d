"""Distributed helpers in one process: fail_fast passthrough, wrapping, launcher command and group kill."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
import torch

from mmref.trainer.distributed import RankInfo, check_all_ranks, fail_fast, wrap_data_parallel
from mmref.trainer.errors import MissingImageError
from mmref.trainer.launch import LaunchConfig, end_group, torchrun_command
from mmref.trainer.job import equal_row_counts, zero_loss_pad
from mmref.trainer.pack import MicroBatch, PackedRow, split_by_tokens

SINGLE = RankInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))


def test_fail_fast_without_a_process_group_reraises_the_original_error():
    with pytest.raises(MissingImageError, match="abc.png"):
        with fail_fast("materialize"):
            raise MissingImageError("abc.png missing")
    with fail_fast("materialize"):
        pass
    check_all_ranks(None, "receive")


def test_single_rank_is_not_wrapped():
    model = torch.nn.Linear(2, 2)
    wrapped, strategy = wrap_data_parallel(model, SINGLE)
    assert wrapped is model and strategy == "single"


def test_torchrun_command_never_restarts_and_carries_multinode_arguments():
    cmd = torchrun_command(["-m", "mmref.trainer.train", "job.json"],
                           LaunchConfig(nproc_per_node=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
            "--master-port=29600", "--max-restarts=0"} <= set(cmd)
    assert cmd[-3:] == ["-m", "mmref.trainer.train", "job.json"]


@pytest.mark.timeout(30)
def test_end_group_kills_a_child_that_ignores_sigterm():
    code = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(0.5)
    start = time.monotonic()
    end_group(proc, grace_s=0.5)
    assert proc.poll() is not None
    assert time.monotonic() - start < 5


def _row(length: int = 3, family: str = "qwen2-vl") -> PackedRow:
    return PackedRow(family=family, token_ids=[1] * length, loss_mask=[False] + [True] * (length - 1),
                     advantages=[0.0] + [1.0] * (length - 1), inference_logprobs=[0.0] + [-1.0] * (length - 1),
                     images=[], sample_lengths=[length], image_pad_id=151655, sample_temperatures=[1.0])


def test_zero_loss_pad_keeps_tokens_and_images_but_drops_every_loss_token():
    row = dataclasses.replace(_row(), token_ids=[1, 2, 3])
    pad = zero_loss_pad(MicroBatch(3, [row]))
    assert pad.step == 3 and pad.rows[0].token_ids == [1, 2, 3]
    assert pad.num_loss_tokens == 0 and pad.rows[0].advantages == [0.0, 0.0, 0.0]


def test_ranks_get_equal_row_counts_topped_up_with_zero_loss_rows():
    """Three one-sample qwen3.5 rows on two ranks: the short rank runs a zero-loss copy, so FSDP2's
    per-forward collectives pair up (2 forwards each) and the loss is unchanged."""
    groups = split_by_tokens([_row(5, "qwen3.5"), _row(4, "qwen3.5"), _row(3, "qwen3.5")], 2)
    equal = equal_row_counts(groups)
    assert [len(g) for g in groups] == [1, 2] and [len(g) for g in equal] == [2, 2]
    assert sum(MicroBatch(0, g).num_loss_tokens for g in equal) == sum(MicroBatch(0, g).num_loss_tokens for g in groups)


def test_job_that_would_sync_weights_without_a_checkpoint_dir_is_refused():
    from pydantic import ValidationError

    from mmref.trainer.job import DistributedJob

    fields = dict(family="qwen2-vl", store_root="store", pub_address="tcp://127.0.0.1:1", ready_address="tcp://127.0.0.1:2",
                  steps=1)
    with pytest.raises(ValidationError, match="inference_url is set but checkpoint_dir is not"):
        DistributedJob(**fields, inference_url="http://127.0.0.1:8000")
    assert DistributedJob(**fields, inference_url="http://127.0.0.1:8000", checkpoint_dir="ckpt").checkpoint_dir == "ckpt"
