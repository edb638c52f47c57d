"""Two torchrun ranks on CPU: an error on one rank or a killed rank ends every rank, fast, with the cause."""

from __future__ import annotations

import socket
import textwrap

import pytest

from mmref.trainer.launch import LaunchConfig, launch

WORKER = textwrap.dedent('''
    import os, sys, time
    import torch
    import torch.distributed as dist
    from mmref.trainer.distributed import init_distributed, wrap_data_parallel, fail_fast, shutdown_distributed
    from mmref.trainer.errors import MissingImageError

    mode = sys.argv[1]
    info = init_distributed(timeout_s=20)
    model, how = wrap_data_parallel(torch.nn.Linear(4, 2), info)
    print(f"rank {info.rank} strategy {how}", flush=True)
    try:
        with fail_fast("materialize"):
            if mode == "error" and info.rank == 1:
                raise MissingImageError("image(s) missing from store: deadbeefdeadbeef.png")
            if mode == "kill" and info.rank == 1:
                os._exit(9)
        model(torch.ones(3, 4)).sum().backward()
        print(f"rank {info.rank} stepped", flush=True)
    except Exception as exc:
        print(f"rank {info.rank} raised {type(exc).__name__}: {exc}", flush=True)
        raise
    finally:
        shutdown_distributed()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, mode: str, timeout_s: float):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return launch([str(script), mode], LaunchConfig(nproc_per_node=2, master_port=_free_port(), timeout_s=timeout_s))


@pytest.mark.timeout(120)
def test_two_ranks_with_fsdp2_step_when_nothing_fails(tmp_path):
    result = _run(tmp_path, "ok", timeout_s=90)
    assert result.returncode == 0, result.output
    assert "rank 0 strategy fsdp2" in result.output and "rank 1 stepped" in result.output


@pytest.mark.timeout(120)
def test_missing_image_on_rank_1_fails_both_ranks_naming_rank_1_and_asset(tmp_path):
    result = _run(tmp_path, "error", timeout_s=90)
    assert result.returncode != 0
    assert result.elapsed_s < 30 + 15  # 30 s budget after start-up (imports take ~10 s on 2 shared cores)
    assert "rank 1 raised MissingImageError: image(s) missing from store: deadbeefdeadbeef.png" in result.output
    assert ("rank 0 raised RankFailedError: materialize failed on rank 1: MissingImageError: "
            "image(s) missing from store: deadbeefdeadbeef.png") in result.output


@pytest.mark.timeout(150)
def test_killed_rank_ends_the_job_within_60s(tmp_path):
    result = _run(tmp_path, "kill", timeout_s=120)
    assert not result.timed_out, result.output
    assert result.returncode != 0
    assert result.elapsed_s < 60
