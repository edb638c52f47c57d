"""The strict record of one rollout: every model call as a node, validated on build and load.

A node holds the exact prompt ids sent, the completion ids and logprobs that came back,
and the prompt's image slots. Invariants (checked by ``Trace`` itself):

- every slot lies wholly on image-pad tokens, slots are sorted and non-overlapping, and
  no pad token is left without a slot;
- the slots are one per image part of the messages the prompt rendered, in message order;
- no processed pixel payload appears anywhere.

``segments()`` turns the nodes into what a trainer learns from: one sequence for a fully
bridged rollout (each prompt extends the previous prompt + completion), a new one where a
turn was re-rendered or sampled at another temperature (a segment carries one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmref.client.errors import TraceError
from mmref.renderers.errors import RefError, SlotError
from mmref.renderers.refs import ImageSlot, check_slots, is_ref_string, reject_pixel_payload


@dataclass(frozen=True)
class TraceSegment:
    """One contiguous token sequence a trainer can learn from (logprobs 0.0 where not sampled).

    ``temperature`` is the sampling temperature of every sampled token in it: the engine's
    logprobs are of ``logits / temperature``, and the trainer must score them alike.
    ``turns`` gives, per token, the index of the node (turn) that sampled it, -1 on context.
    """

    family: str
    token_ids: list[int]
    sampled_mask: list[bool]
    logprobs: list[float]
    images: list[ImageSlot]
    weight_version: int | None = None
    temperature: float = 1.0
    turns: list[int] = field(default_factory=list)


class TraceNode(BaseModel):
    """One model call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_logprobs: list[float]
    images: list[ImageSlot]
    num_messages: int = Field(ge=0)  # how many of the trace's messages this prompt rendered
    finish_reason: str = "stop"
    weight_version: int | None = None
    temperature: float = Field(ge=0)  # of the request (required): its logprobs are of logits / temperature

    @model_validator(mode="after")
    def _aligned(self) -> TraceNode:
        if len(self.completion_ids) != len(self.completion_logprobs):
            raise ValueError(f"{len(self.completion_ids)} completion ids but {len(self.completion_logprobs)} logprobs")
        return self


class Trace(BaseModel):
    """A validated rollout: its nodes, final messages (refs only) and reward."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rollout_id: str
    group_id: str | None = None
    family: str
    image_pad_id: int
    stop_token_ids: list[int]
    messages: list[dict[str, Any]]
    nodes: list[TraceNode]
    reward: float = 0.0
    turn_rewards: list[float] = Field(default_factory=list)  # the env's reward so far after each node
    metrics: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _invariants(self) -> Trace:
        try:
            reject_pixel_payload({"messages": self.messages, "metrics": self.metrics}, "trace")
        except RefError as exc:
            raise ValueError(str(exc)) from None
        if self.turn_rewards and len(self.turn_rewards) != len(self.nodes):
            raise ValueError(f"{len(self.turn_rewards)} turn rewards for {len(self.nodes)} nodes (one per node, or none)")
        image_urls = _image_refs_in_order(self.messages)
        for index, node in enumerate(self.nodes):
            try:
                check_slots(node.prompt_ids + node.completion_ids, node.images, self.image_pad_id,
                            sampled=[False] * len(node.prompt_ids) + [True] * len(node.completion_ids),
                            where=f"node {index} (prompt + completion)")
            except SlotError as exc:
                raise ValueError(str(exc)) from None
            expected = image_urls[: _count_images(self.messages[: node.num_messages])]
            actual = [s.ref.encode() for s in node.images]
            if actual != expected:
                raise ValueError(f"node {index}: {len(actual)} image slots do not match the {len(expected)} image "
                                 "parts of its messages in order (one slot per image part)")
        return self

    @classmethod
    def build(cls, **fields: Any) -> Trace:
        """Construct and validate; invariant failures are ``TraceError``."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise TraceError(f"invalid trace: {_problems(exc)}") from None

    # -- serialization --------------------------------------------------------------------

    def to_json(self) -> str:
        return self.model_dump_json()

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.model_dump(mode="json"), use_bin_type=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Trace:
        return cls._load(json.loads(text))

    @classmethod
    def from_msgpack(cls, data: bytes) -> Trace:
        return cls._load(msgpack.unpackb(data, raw=False))

    @classmethod
    def _load(cls, payload: Any) -> Trace:
        try:
            reject_pixel_payload(payload, "trace")
            return cls.model_validate(payload)
        except (ValidationError, RefError) as exc:
            detail = _problems(exc) if isinstance(exc, ValidationError) else str(exc)
            raise TraceError(f"invalid trace: {detail}") from None

    # -- learning view ----------------------------------------------------------------------

    def returns_to_go(self) -> list[float]:
        """Per node: the reward earned from that turn on (the final reward less the reward before it).

        Without ``turn_rewards`` every node gets the episode's reward.
        """
        if not self.turn_rewards:
            return [self.reward] * len(self.nodes)
        before = [0.0] + self.turn_rewards[:-1]
        return [self.turn_rewards[-1] - b for b in before]

    def segments(self) -> list[TraceSegment]:
        """Sequences to learn from: nodes whose prompts extend the previous turn join one segment."""
        segments: list[TraceSegment] = []
        current: TraceSegment | None = None
        previous: TraceNode | None = None
        for turn, node in enumerate(self.nodes):
            if current is not None and previous is not None and self._extends(previous, node):
                current = self._extend(current, previous, node, turn)
            else:
                if current is not None:
                    segments.append(current)
                current = self._start(node, turn)
            previous = node
        if current is not None:
            segments.append(current)
        return segments

    def _kept_completion(self, node: TraceNode) -> int:
        """Completion tokens the next bridged prompt keeps verbatim (through the first stop)."""
        for i, token in enumerate(node.completion_ids):
            if token in self.stop_token_ids:
                return i + 1
        return len(node.completion_ids)

    def _extends(self, previous: TraceNode, node: TraceNode) -> bool:
        if node.temperature != previous.temperature:
            return False
        kept = previous.prompt_ids + previous.completion_ids[: self._kept_completion(previous)]
        return node.prompt_ids[: len(kept)] == kept

    def _start(self, node: TraceNode, turn: int) -> TraceSegment:
        n, m = len(node.prompt_ids), len(node.completion_ids)
        return TraceSegment(self.family, node.prompt_ids + node.completion_ids, [False] * n + [True] * m,
                            [0.0] * n + list(node.completion_logprobs), list(node.images), node.weight_version,
                            node.temperature, [-1] * n + [turn] * m)

    def _extend(self, segment: TraceSegment, previous: TraceNode, node: TraceNode, turn: int) -> TraceSegment:
        # The previous prompt and completion (through its stop) lie in this prompt verbatim:
        # keep their sampled flags and logprobs, the rest of the prompt is context.
        kept = len(previous.prompt_ids) + self._kept_completion(previous)
        context = len(node.prompt_ids) - kept
        return TraceSegment(
            self.family, node.prompt_ids + node.completion_ids,
            segment.sampled_mask[:kept] + [False] * context + [True] * len(node.completion_ids),
            segment.logprobs[:kept] + [0.0] * context + list(node.completion_logprobs),
            list(node.images), node.weight_version, node.temperature,
            segment.turns[:kept] + [-1] * context + [turn] * len(node.completion_ids),
        )


def _image_refs_in_order(messages: list[dict[str, Any]]) -> list[str]:
    refs = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url")
                if not is_ref_string(url):
                    raise ValueError("trace messages hold an image that is not a store ref")
                refs.append(url)
    return refs


def _count_images(messages: list[dict[str, Any]]) -> int:
    return len(_image_refs_in_order(messages))


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'trace'}: {e['msg']}" for e in exc.errors())
