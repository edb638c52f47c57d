"""Checks of a generate request, all before any compute; each failure is a 400 naming the problem.

Per image slot: the ref parses; its family and layout fingerprint match the served model's
live processor; grid and token count recompute to the ref's (``verify_ref``); the slot's
length equals ``num_tokens``. The slots must be exactly the prompt's image-pad runs
(``check_slots``, the invariant every stage checks), and prompt + max_tokens must fit
``max_model_len``. The
bytes are hash-verified when the feature cache loads them.
"""

from __future__ import annotations

from typing import Any

from mmref.renderers.contract import verify_ref
from mmref.renderers.errors import MMRefError, SlotError
from mmref.renderers.layout import LayoutSpec
from mmref.renderers.refs import ImageSlot, RawImageRef, check_slots, parse_ref
from mmref.trainer.inference.api import GenerateRequest


class RequestError(ValueError):
    """A bad request: status 400 (or ``status``), a message, and structured detail."""

    def __init__(self, message: str, detail: dict[str, Any] | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.detail, self.status, self.kind = detail or {}, status, kind


def validate_request(request: GenerateRequest, spec: LayoutSpec, image_pad_id: int, max_model_len: int,
                     vocab_size: int) -> list[ImageSlot]:
    """The request's image slots, checked; raises ``RequestError`` on the first problem."""
    tokens = request.token_ids
    bad = next((i for i, t in enumerate(tokens) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token_ids[{bad}] = {tokens[bad]} is outside the model's vocabulary [0, {vocab_size})",
                           {"position": bad, "expected": f"[0, {vocab_size})", "actual": tokens[bad]})
    needed = len(tokens) + request.sampling.max_tokens
    if needed > max_model_len:
        raise RequestError(f"prompt of {len(tokens)} tokens + max_tokens {request.sampling.max_tokens} = {needed} "
                           f"exceeds max_model_len {max_model_len}", {"expected": max_model_len, "actual": needed})
    slots = []
    for index, wire in enumerate(request.images):
        ref = _parse(wire.ref, index)
        detail = {"slot": index, "asset": ref.asset, "sha256": ref.sha256}
        try:
            verify_ref(ref, spec, stage="inference server")
        except MMRefError as exc:
            raise RequestError(str(exc), detail) from None
        if wire.length != ref.num_tokens or wire.offset < 0:
            raise RequestError(f"image slot {index} ({ref.describe()}): offset {wire.offset}, length {wire.length}; "
                               f"expected offset >= 0 and length == ref.num_tokens {ref.num_tokens}",
                               detail | {"expected": ref.num_tokens, "actual": wire.length})
        slots.append(ImageSlot(ref=ref, offset=wire.offset, length=wire.length))
    try:
        check_slots(tokens, slots, image_pad_id, where=f"{len(tokens)}-token prompt")
    except SlotError as exc:
        raise RequestError(str(exc), {"image_pad_id": image_pad_id}) from None
    return slots


def _parse(text: str, index: int) -> RawImageRef:
    try:
        return parse_ref(text)
    except MMRefError as exc:
        raise RequestError(f"image slot {index}: {exc}", {"slot": index}) from None
