"""Training samples: immutable token sequences with their image refs (never pixels).

    TrainingSample.from_segment(segment, advantage=0.7, image_pad_id=151655)

A sample is validated when built: the per-token lists agree in length and the image slots
are exactly the sequence's image-pad runs, none on a sampled token
(``mmref.renderers.refs.check_slots``, the invariant every stage checks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmref.renderers.refs import ImageSlot, check_slots, token_types
from mmref.trainer.errors import SampleError


@dataclass(frozen=True)
class TrainingSample:
    """One sequence to learn from.

    loss_mask:          True on sampled tokens (the only ones with a policy-gradient term)
    advantages:         per token (the sample's advantage on sampled tokens, else 0)
    inference_logprobs: per token (engine logprobs on sampled tokens, else 0)
    temperature:        the sampling temperature of the request that produced the sampled
                        tokens; the trainer scores them under the same ``logits / T``
    """

    family: str
    token_ids: list[int]
    loss_mask: list[bool]
    advantages: list[float]
    inference_logprobs: list[float]
    images: list[ImageSlot]
    image_pad_id: int
    weight_version: int | None = None
    temperature: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        for name in ("loss_mask", "advantages", "inference_logprobs"):
            if len(getattr(self, name)) != n:
                raise SampleError(f"{name} has {len(getattr(self, name))} entries for {n} tokens")
        check_slots(self.token_ids, self.images, self.image_pad_id, sampled=self.loss_mask, where="training sample")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def mm_token_type_ids(self) -> list[int]:
        """1 on image-pad tokens, 0 elsewhere (derived from the slots)."""
        return token_types(len(self.token_ids), self.images)

    @classmethod
    def from_segment(cls, segment: Any, advantage: float | Sequence[float], image_pad_id: int) -> TrainingSample:
        """A sample from a trace segment (``mmref.client.trace.TraceSegment``).

        ``advantage`` is one number for every sampled token, or one per turn of the trace
        (indexed by the segment's ``turns``).
        """
        mask = [bool(m) for m in segment.sampled_mask]
        if isinstance(advantage, Sequence):
            per_token = [advantage[t] if m else 0.0 for m, t in zip(mask, segment.turns, strict=True)]
        else:
            per_token = [advantage if m else 0.0 for m in mask]
        return cls(
            family=segment.family, token_ids=list(segment.token_ids), loss_mask=mask,
            advantages=per_token,
            inference_logprobs=[float(lp) if m else 0.0 for lp, m in zip(segment.logprobs, mask)],
            images=list(segment.images), image_pad_id=image_pad_id,
            weight_version=segment.weight_version, temperature=segment.temperature,
        )


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """GRPO advantages: rewards normalized within their group, (r - mean) / (std + eps).

    A group whose rewards are all equal carries no signal and gets zeros.
    """
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    if std < eps:
        return [0.0] * len(rewards)
    return [(r - mean) / (std + eps) for r in rewards]


def group_turn_advantages(returns: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per member and turn: its return-to-go normalized among the members that reached that turn.

    ``returns[i][t]`` is member i's reward from turn t on (``Trace.returns_to_go``). A turn's
    advantage then carries only what that turn and later ones earned, not the noise of
    earlier turns' rewards; a turn only one member reached gets 0.
    """
    turns = max((len(r) for r in returns), default=0)
    columns = [iter(group_advantages([r[t] for r in returns if len(r) > t])) for t in range(turns)]
    return [[next(columns[t]) for t in range(len(r))] for r in returns]
