"""A finished ``chat.completion`` as OpenAI ``chat.completion.chunk`` server-sent events.

The interception server samples the whole answer first, then streams it the way the OpenAI
API does, so agent code written for ``stream=True`` runs unchanged::

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", "content": ""}}], ...}
    data: {... "delta": {"content": "The"}}                 one chunk per word of the content
    data: {... "delta": {"content": " sky"}}
    data: {... "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "f", "arguments": ""}}]}}
    data: {... "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\\"x\\": 1}"}}]}}
    data: {... "delta": {}, "finish_reason": "tool_calls"}
    data: {... "choices": [], "usage": {...}}                only with stream_options.include_usage
    data: [DONE]

Joining the deltas gives back the message of the ``chat.completion`` exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

DONE = b"data: [DONE]\n\n"


def chunks(completion: dict[str, Any], include_usage: bool = False) -> list[dict[str, Any]]:
    """The chunk objects of a ``chat.completion`` (one choice), in stream order."""
    (choice,) = completion["choices"]
    message = choice["message"]
    head = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
            "model": completion["model"]}
    if include_usage:  # as the OpenAI API: every chunk has the key, only the last one a value
        head["usage"] = None

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": piece}) for piece in content_pieces(message.get("content") or "")]
    for index, call in enumerate(message.get("tool_calls") or []):
        out.append(chunk({"tool_calls": [{"index": index, "id": call["id"], "type": call["type"],
                                          "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        out.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]}))
    out.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        out.append({**head, "choices": [], "usage": completion["usage"]})
    return out


def content_pieces(content: str) -> list[str]:
    """``content`` cut before each word (whitespace goes with the word after it): "a b " -> ["a", " b", " "]."""
    return re.findall(r"\s*\S+|\s+", content)


def events(completion: dict[str, Any], include_usage: bool = False) -> Iterator[bytes]:
    """The server-sent events of a ``chat.completion``: one ``data:`` line per chunk, then ``[DONE]``."""
    for chunk in chunks(completion, include_usage):
        yield b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
    yield DONE
