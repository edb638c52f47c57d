"""OpenAI-compatible front end, so agent code written for the OpenAI SDK runs inside a rollout.

    POST /v1/chat/completions            (session from the API key: "Bearer <session>")
    POST /sessions/{session}/v1/chat/completions
    GET  /v1/models
    GET  /sessions/{session}/trace         (the session's validated trace, JSON)

Per session: images are prepared into store refs, the conversation is rendered (bridged
from the previous turn when it extends it), the inference server samples, and each call
is recorded as a trace node (also written to ``trace_dir/<session>.json`` after each call
when a directory is given). A bad request is a 400 with an OpenAI-shaped error body (SDKs
do not retry it); a failing inference server is a 502, an unreachable one a 503.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmref.client.errors import (
    ImageInputError,
    InferenceRequestError,
    InferenceServerError,
    InferenceUnavailableError,
    TraceError,
)
from mmref.client.images import prepare_images
from mmref.client.trace import Trace, TraceNode
from mmref.client.train_client import Sampling, TrainClient
from mmref.renderers.errors import MMRefError
from mmref.renderers.store import ImageStore


@dataclass
class Session:
    """One agent's conversation: the nodes so far and the last rendered prompt."""

    id: str
    nodes: list[TraceNode] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    last: Any = None  # (RenderedTokens, completion ids, messages) of the previous call

    def trace(self, renderer: Any, reward: float = 0.0) -> Trace:
        return Trace.build(rollout_id=self.id, family=renderer.family, image_pad_id=renderer.image_pad_id,
                           stop_token_ids=renderer.stop_token_ids, messages=self.messages, nodes=self.nodes,
                           reward=reward)


_PART = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["text", "image_url", "image"]},
    "text": {"type": "string"},
    "image_url": {"type": "object", "properties": {"url": {"type": "string"}}},
}}
# The OpenAI chat request as far as mmref reads it; documents the endpoints and drives the fuzz tests.
CHAT_REQUEST_SCHEMA: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["messages"], "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"], "properties": {
                "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
                "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _PART}, {"type": "null"}]},
                "tool_call_id": {"type": "string"},
            }}},
        "tools": {"type": "array", "items": {"type": "object"}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer"},
    }}}}}}


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def create_interception_app(renderer: Any, client: TrainClient, store: ImageStore, model_name: str = "mmref",
                            trace_dir: str | Path | None = None) -> FastAPI:
    """The interception app; ``app.state.sessions`` holds each session's trace so far."""
    app = FastAPI(title="mmref interception")
    if trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
    sessions: dict[str, Session] = {}
    app.state.sessions = sessions

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405
        return openai_error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "mmref"}]}

    @app.post("/v1/chat/completions", openapi_extra=CHAT_REQUEST_SCHEMA)
    async def chat(request: Request) -> JSONResponse:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return await _complete(request, key or "default")

    @app.post("/sessions/{session_id}/v1/chat/completions", openapi_extra=CHAT_REQUEST_SCHEMA)
    async def chat_in_session(session_id: str, request: Request) -> JSONResponse:
        return await _complete(request, session_id)

    @app.get("/sessions/{session_id}/trace")
    async def trace(session_id: str) -> JSONResponse:
        if session_id not in sessions:
            return openai_error(404, f"no session {session_id!r}; sessions: {sorted(sessions)[:20]}",
                                "invalid_request_error")
        return JSONResponse(sessions[session_id].trace(renderer).model_dump(mode="json"))

    async def _complete(request: Request, session_id: str) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return openai_error(400, "request body is not JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return openai_error(400, "'messages' must be a non-empty list", "invalid_request_error", "messages")
        session = sessions.setdefault(session_id, Session(session_id))
        try:
            messages, _ = prepare_images(body["messages"], store, renderer.spec)
            rendered = _render(renderer, session, messages, body.get("tools"))
            sampling = Sampling(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                                max_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or 256),
                                seed=body.get("seed"))
            result = await client.generate(rendered, sampling)
        except InferenceUnavailableError as exc:  # before MMRefError: these are client errors too
            return openai_error(503, str(exc), "server_error")
        except InferenceServerError as exc:
            return openai_error(502, str(exc), "server_error")
        except InferenceRequestError as exc:
            return openai_error(400, f"inference server refused the request: {exc}", "invalid_request_error")
        except (ImageInputError, MMRefError, TraceError, ValueError, TypeError) as exc:
            return openai_error(400, str(exc), "invalid_request_error")
        completion = result.completions[0]
        session.nodes.append(TraceNode(prompt_ids=rendered.token_ids, completion_ids=completion.token_ids,
                                       completion_logprobs=completion.logprobs, images=rendered.images,
                                       num_messages=len(messages), finish_reason=completion.finish_reason,
                                       weight_version=result.weight_version))
        parsed = renderer.parse_response(completion.token_ids)
        session.messages = messages + [{"role": "assistant", "content": parsed.content}]
        session.last = (rendered, completion.token_ids, messages)
        if trace_dir is not None:
            _write_trace(Path(trace_dir), session.trace(renderer))
        return JSONResponse(_chat_response(model_name, parsed, completion, rendered))

    return app


def _write_trace(directory: Path, trace: Trace) -> None:
    """``<session>.json``, replaced atomically; session ids that are not safe file names are hex-encoded."""
    name = trace.rollout_id if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", trace.rollout_id) else trace.rollout_id.encode().hex()
    tmp = directory / f".{name}.json.tmp"
    tmp.write_text(trace.to_json())
    tmp.replace(directory / f"{name}.json")


def _render(renderer: Any, session: Session, messages: list[dict[str, Any]], tools: Any) -> Any:
    """Bridge from the session's previous call when ``messages`` extends it, else render in full."""
    if session.last is not None and not tools:
        rendered, completion_ids, previous = session.last
        history = len(previous) + 1  # previous messages + the assistant reply the agent echoes back
        if len(messages) > history and messages[: len(previous)] == previous:
            bridged = renderer.bridge_to_next_turn(rendered.token_ids, completion_ids, messages[history:],
                                                   rendered.images, prev=rendered)
            if bridged is not None:
                return bridged
    return renderer.render(messages, tools=tools)


def _chat_response(model: str, parsed: Any, completion: Any, rendered: Any) -> dict[str, Any]:
    tool_calls = [{"id": f"call_{uuid.uuid4().hex[:8]}", "type": "function",
                   "function": {"name": c.name, "arguments": _json(c.arguments)}}
                  for c in parsed.tool_calls if c.status == "ok"]
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    finish = "tool_calls" if tool_calls else ("stop" if completion.finish_reason == "stop" else "length")
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": len(rendered.token_ids), "completion_tokens": len(completion.token_ids),
                  "total_tokens": len(rendered.token_ids) + len(completion.token_ids)},
    }


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)
