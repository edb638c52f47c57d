"""Reading an interception server's ``stream=True`` answer as the OpenAI SDK accumulates it."""

from __future__ import annotations

import json

import httpx


def sse_chunks(response: httpx.Response) -> list[dict]:
    """The ``chat.completion.chunk`` objects of a server-sent-events body (``[DONE]`` checked and dropped)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]" and all(e.startswith("{") for e in events[:-1])
    return [json.loads(e) for e in events[:-1]]


def joined(chunks: list[dict]) -> dict:
    """The message the SDK's stream accumulation makes of the chunks: role, content, tool calls, finish reason."""
    message: dict = {"role": None, "content": "", "finish_reason": None}
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            message["role"] = delta.get("role") or message["role"]
            message["content"] += delta.get("content") or ""
            message["finish_reason"] = choice["finish_reason"] or message["finish_reason"]
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"type": None, "function": {"name": "", "arguments": ""}})
                entry.update({k: call[k] for k in ("id", "type") if k in call})
                for k, v in call.get("function", {}).items():
                    entry["function"][k] += v
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message
