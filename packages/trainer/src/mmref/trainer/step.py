"""One optimizer step of the policy on packed micro-batches (single process or one rank).

    trainer = PolicyTrainer(model, store=store, spec=spec, processor=processor, config=TrainConfig())
    metrics = trainer.step([micro_batch])
    # or check and load pixels first (ranks do, inside fail_fast), then step on what that made:
    metrics = trainer.step(trainer.prepare([micro_batch]))

Pixels are materialized once per step: every unique image of all the step's micro-batches
is read, processed and moved to the device once.

The loss is a token-level mean over every loss token of the step (``normalizer``; under
data parallelism the caller passes the global count so every rank scales alike).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from mmref.renderers.layout import LayoutSpec
from mmref.renderers.refs import check_slots
from mmref.renderers.store import ImageStore
from mmref.trainer.forward import RowOutput, forward_row, rope_index_of
from mmref.trainer.loss import policy_loss
from mmref.trainer.lr_schedule import build_scheduler
from mmref.trainer.materialize import MaterializedRow, Materializer
from mmref.trainer.pack import MicroBatch
from mmref.trainer.precision import trainable_parameters
from mmref.trainer.run_config import TrainConfig


@dataclass(frozen=True)
class StepMetrics:
    """What one step reports (averages are per loss token)."""

    loss: float
    entropy: float
    clip_fraction: float
    mismatch_kl: float
    ref_kl: float  # k3 estimate of KL(policy || reference) per loss token; 0 without a reference
    tis_weight: float  # mean truncated importance weight per loss token (train.tis_cap); 0 when off
    tis_capped_fraction: float  # loss tokens whose weight hit train.tis_cap
    grad_norm: float
    loss_tokens: int
    images_processed: int
    missing_images: int
    masked_sampled_image_tokens: int
    lr: float
    materialize_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def combine(cls, ranks: Sequence[StepMetrics]) -> StepMetrics:
        """One step's metrics from every rank's share of it.

        Each rank's ``loss`` is its loss sum over ``global tokens / world size`` (see
        ``train._global_normalizer``), so the step's loss is their mean; per-token averages are
        weighted by each rank's loss tokens; counts add up; times are the slowest rank's.
        """
        tokens = [m.loss_tokens for m in ranks]
        total = max(1, sum(tokens))

        def weighted(name: str) -> float:
            return sum(getattr(m, name) * t for m, t in zip(ranks, tokens)) / total

        return cls(
            loss=sum(m.loss for m in ranks) / len(ranks), entropy=weighted("entropy"),
            clip_fraction=weighted("clip_fraction"), mismatch_kl=weighted("mismatch_kl"), ref_kl=weighted("ref_kl"),
            tis_weight=weighted("tis_weight"), tis_capped_fraction=weighted("tis_capped_fraction"),
            grad_norm=max(m.grad_norm for m in ranks), loss_tokens=sum(tokens), lr=ranks[0].lr,
            **{name: sum(getattr(m, name) for m in ranks)
               for name in ("images_processed", "missing_images", "masked_sampled_image_tokens")},
            **{name: max(getattr(m, name) for m in ranks)
               for name in ("materialize_s", "forward_s", "backward_s", "optimizer_s")},
        )


@dataclass(frozen=True)
class PreparedStep:
    """A step's rows, checked and materialized (pixels on the device), with what it cost."""

    micro_batches: list[MicroBatch]
    rows: list[MaterializedRow]  # every row of every micro-batch, in order
    labels: list[str]            # "step S micro-batch M row R" per row, for errors
    seconds: float
    images_processed: int
    missing_images: int


class PolicyTrainer:
    """Model + optimizer + materializer; ``step`` does materialize -> forward -> loss -> update."""

    def __init__(self, model: torch.nn.Module, *, store: ImageStore, spec: LayoutSpec, processor, config: TrainConfig,
                 image_token_ids: Iterable[int], materializer: Materializer | None = None,
                 total_steps: int | None = None, reference: torch.nn.Module | None = None) -> None:
        if config.kl_coef > 0 and reference is None:
            raise ValueError("train.kl_coef > 0 needs a frozen reference model (mmref.trainer.step.frozen_copy)")
        self.model, self.spec, self.config, self.reference = model, spec, config, reference
        self.image_token_ids = frozenset(image_token_ids)
        self.materializer = materializer or Materializer(store, spec, processor,
                                                         missing_image_policy=config.missing_image_policy)
        self.optimizer = torch.optim.AdamW(trainable_parameters(model), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, total_steps=total_steps or 1, warmup_steps=config.warmup_steps,
                                         decay=config.lr_decay if total_steps else "constant",
                                         min_ratio=config.min_lr_ratio)
        self.rope_index = rope_index_of(model)

    def forward(self, batch: MaterializedRow, where: str = "row") -> RowOutput:
        return forward_row(self.model, batch, self.rope_index, self.image_token_ids, self.spec.merge_size, where=where)

    def reference_logprobs(self, batch: MaterializedRow, where: str) -> torch.Tensor | None:
        """The reference model's logprobs of the row's tokens then its branches (None without one)."""
        if self.reference is None:
            return None
        with torch.no_grad():
            out = forward_row(self.reference, batch, self.rope_index, self.image_token_ids, self.spec.merge_size,
                              where=where)
        return torch.cat([out.logprobs, out.branch_logprobs])

    def prepare(self, micro_batches: Sequence[MicroBatch]) -> PreparedStep:
        """Check every row's slots against its token ids, then materialize the whole step at once."""
        labels = [f"step {mb.step} micro-batch {m} row {r}" for m, mb in enumerate(micro_batches)
                  for r in range(len(mb.rows))]
        rows = [row for mb in micro_batches for row in mb.rows]
        for row, label in zip(rows, labels):
            check_slots(row.token_ids, row.images, row.image_pad_id, where=label)
        stats = self.materializer.stats
        before = (stats.images_processed, stats.missing_images)
        start = time.perf_counter()
        materialized = self.materializer.materialize(rows)
        return PreparedStep(list(micro_batches), materialized, labels, time.perf_counter() - start,
                            stats.images_processed - before[0], stats.missing_images - before[1])

    def step(self, batches: Sequence[MicroBatch] | PreparedStep, normalizer: int | None = None) -> StepMetrics:
        """One optimizer step over a step's micro-batches (gradients accumulated over every row)."""
        prepared = batches if isinstance(batches, PreparedStep) else self.prepare(batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        normalizer = normalizer or max(1, sum(mb.num_loss_tokens for mb in prepared.micro_batches))
        times = dict(forward=0.0, backward=0.0)
        sums = dict(loss=0.0, entropy=0.0, clipped=0, mismatch=0.0, ref_kl=0.0, tis=0.0, tis_capped=0, tokens=0,
                    masked=0)
        for batch, label in zip(prepared.rows, prepared.labels):
            start = time.perf_counter()
            out = self.forward(batch, label)
            device = out.logprobs.device
            row = batch.row
            reference = self.reference_logprobs(batch, label)
            result = policy_loss(  # the row's own tokens, then its branches
                torch.cat([out.logprobs, out.branch_logprobs]),
                torch.tensor(row.inference_logprobs[1:] + row.branch_logprobs, device=device),
                torch.tensor(row.advantages[1:] + row.branch_advantages, device=device),
                torch.cat([out.loss_mask, out.branch_mask]), torch.cat([out.entropy, out.branch_entropy]),
                self.config.clip_low, self.config.clip_high, entropy_coef=self.config.entropy_coef,
                kl_coef=self.config.kl_coef, ref_logprobs=reference, tis_cap=self.config.tis_cap,
            )
            times["forward"] += time.perf_counter() - start
            start = time.perf_counter()
            (result.loss_sum / normalizer).backward()
            times["backward"] += time.perf_counter() - start
            sums["loss"] += float(result.loss_sum.detach())
            sums["entropy"] += result.entropy_sum
            sums["clipped"] += result.clipped
            sums["mismatch"] += result.mismatch_kl_sum
            sums["ref_kl"] += result.ref_kl_sum
            sums["tis"] += result.tis_weight_sum
            sums["tis_capped"] += result.tis_capped
            sums["tokens"] += result.tokens
            sums["masked"] += out.masked_sampled_image_tokens
        start = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.config.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        optimizer_s = time.perf_counter() - start
        tokens = max(1, sums["tokens"])
        return StepMetrics(
            loss=sums["loss"] / normalizer, entropy=sums["entropy"] / tokens, clip_fraction=sums["clipped"] / tokens,
            mismatch_kl=sums["mismatch"] / tokens, ref_kl=sums["ref_kl"] / tokens, tis_weight=sums["tis"] / tokens,
            tis_capped_fraction=sums["tis_capped"] / tokens, grad_norm=float(grad_norm), loss_tokens=sums["tokens"],
            images_processed=prepared.images_processed, missing_images=prepared.missing_images,
            masked_sampled_image_tokens=sums["masked"], lr=lr, materialize_s=prepared.seconds,
            forward_s=times["forward"], backward_s=times["backward"], optimizer_s=optimizer_s,
        )


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` that never trains: the reference of ``train.kl_coef``."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference
