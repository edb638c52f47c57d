"""What one RL step did: the typed record behind each line of ``metrics.jsonl``.

    record = StepRecord(step=3, reward_mean=0.5, ..., rollout_times={"env_s": 0.1}, trainer={"loss": 0.2})
    record.as_dict()   # {"step": 3, "reward_mean": 0.5, ..., "rollout_env_s": 0.1, ..., "loss": 0.2}

``rollout_times`` are flattened with a ``rollout_`` prefix and ``trainer`` (what the trainer
ranks reported: loss, grad_norm, ranks, ...) as is, in field order; ``evals`` only when any ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """One step's rewards, sizes and seconds (all ``perf_counter`` wall time)."""

    step: int
    reward_mean: float
    reward_by_turn: list[float]     # mean reward earned at each turn index (empty without turn rewards)
    rollouts: int
    rollouts_dropped: int           # lost with groups whose environment or agent failed
    samples: int
    rows: int                       # packed rows
    occupancy: float                # packed tokens / (rows * max_seq_len)
    tokens_per_s: float             # sampled tokens per step second
    images_per_s: float
    rollout_s: float                # the wait for this step's rollouts
    train_s: float
    step_s: float
    rollout_times: dict[str, float]  # collect_s, env_s, render_s, generate_s, http_server_s, requests, ...
    samples_s: float
    pack_s: float
    trainer_s: float
    weight_load_s: float
    request_bytes: int
    pixel_values_bytes: int         # what the step's images would weigh as float32 pixel_values
    off_policy_lag: int
    trainer: dict[str, Any]         # the trainer's step metrics
    evals: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line."""
        line: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rollout_times":
                line.update({f"rollout_{k}": v for k, v in value.items()})
            elif f.name == "trainer":
                line.update(value)
            elif f.name != "evals" or value:
                line[f.name] = value
        return line
