"""Learning-rate schedules: a linear warmup, then constant, linear or cosine decay to ``min_lr_ratio``.

    >>> [round(lr_factor(s, total_steps=10, warmup_steps=2, decay="cosine", min_ratio=0.1), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.1]

``lr_factor(s)`` multiplies ``train.lr`` for optimizer step ``s`` (0-based): warmup reaches
the full rate at step ``warmup_steps - 1``; decay runs from step ``warmup_steps`` (full rate)
to step ``total_steps - 1`` (``min_ratio``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Decay = Literal["constant", "linear", "cosine"]


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, decay: Decay, min_ratio: float) -> float:
    """The fraction of the peak learning rate used at optimizer step ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps - 1)  # the last step (total_steps - 1) lands on min_ratio
    progress = min(1.0, (step - warmup_steps) / span)
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, decay: Decay,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``lr_factor``; call ``.step()`` after each ``optimizer.step()``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps=total_steps, warmup_steps=warmup_steps, decay=decay, min_ratio=min_ratio))
