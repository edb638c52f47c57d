"""The contract between the orchestrator and its trainer ranks: the job every rank reads, and the pad batch.

    job = DistributedJob(family="qwen2-vl", store_root="runs/x/store", pub_address=..., ready_address=..., steps=60)
    Path("job.json").write_text(job.model_dump_json())     # torchrun ... -m mmref.trainer.train job.json

The orchestrator (``rl_trainer``) writes the job and deals micro-batches of refs over the
transport (``equal_row_counts`` and ``zero_loss_pad`` fill a short rank's share); each rank
(``train``) reads them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmref.trainer.pack import MicroBatch, PackedRow
from mmref.trainer.resume import StatePlan
from mmref.trainer.run_config import TrainConfig


class DistributedJob(BaseModel):
    """What every rank of a training job needs; one JSON file shared by all ranks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str
    store_root: str                      # local dir or fsspec URL every node can read
    pub_address: str                     # the packer's PUB socket
    ready_address: str                   # the packer's READY PULL socket
    steps: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: NCCL on CUDA when present, else gloo on CPU
    min_pixels: int | None = None        # overrides of the processor config's pixel limits
    max_pixels: int | None = None
    seed: int = 0                        # the tiny model's seed when there is no model_path
    model_path: str | None = None        # a model directory (policy.load_policy); None: a tiny model of family
    checkpoint_dir: str | None = None    # rank 0 writes weights here after each step
    inference_url: str | None = None     # then POSTs /update_weights here
    report_dir: str | None = None        # per-rank JSON of what each step received and did
    metrics_path: str | None = None      # rank 0 appends each step's metrics, once its weights are served
    ready_timeout_s: float = 60.0
    recv_timeout_s: float = 120.0
    collective_timeout_s: float = 120.0
    train: TrainConfig = TrainConfig()
    state: StatePlan | None = None       # where and when to write resumable state, and the state to start from

    @model_validator(mode="after")
    def _sync_needs_weights(self) -> DistributedJob:
        if self.inference_url and not self.checkpoint_dir:
            raise ValueError("inference_url is set but checkpoint_dir is not: the server loads weights from there")
        return self


def zero_loss_pad(micro_batch: MicroBatch) -> MicroBatch:
    """A copy of ``micro_batch`` that contributes nothing to the loss: the padding ``deal`` gives short ranks.

    A copy rather than a text-only row because FSDP2 reduces only parameters that received a
    gradient: a rank whose pad skipped the vision tower would mismatch the others' reduce-scatter.
    """
    return MicroBatch(micro_batch.step, [zero_loss_row(row) for row in micro_batch.rows])


def zero_loss_row(row: PackedRow) -> PackedRow:
    """A copy of ``row`` with every loss token and branch dropped (tokens and images kept)."""
    return replace(row, loss_mask=[False] * len(row), advantages=[0.0] * len(row), branch_positions=[],
                   branch_token_ids=[], branch_advantages=[], branch_logprobs=[])


def equal_row_counts(groups: list[list[PackedRow]]) -> list[list[PackedRow]]:
    """``groups`` (one per rank) topped up to one row count with zero-loss copies of the first group's rows.

    Every rank then runs as many forwards, so FSDP2's per-forward collectives pair up; a rank
    with fewer rows would wait forever. Families packed one sample per row (qwen3.5) make
    uneven counts common.

    >>> [len(g) for g in equal_row_counts([])]
    []
    """
    count = max((len(g) for g in groups), default=0)
    fill = [zero_loss_row(row) for row in groups[0]] if groups else []
    return [group + [fill[i % len(fill)] for i in range(count - len(group))] for group in groups]
