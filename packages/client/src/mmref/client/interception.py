"""OpenAI-compatible front end, so agent code written for the OpenAI SDK runs inside a rollout.

    POST /v1/chat/completions            (session from the API key: "Bearer <session>", else "default")
    POST /sessions/{session}/v1/chat/completions
    GET  /v1/models
    GET  /sessions/{session}/trace       {"session": id, "traces": [Trace JSON, one per episode]}

A session holds episodes. A call whose messages start with the previous call's messages
(the agent resends its conversation and appends to it) continues the current episode; any
other call (a new task, a retry, an edited history) starts a new episode, and the earlier
ones stay in the session's trace list::

    episode 0:  [u1] -> a1,  [u1, a1, u2] -> a2       (bridged: a1 echoed unchanged)
    episode 1:  [u1, a1, u3] -> b1                     (does not start with [u1, a1, u2])

Within an episode a call is bridged from the previous one (that prompt and completion
verbatim, ``bridge_to_next_turn``) when the agent echoed the reply unchanged, kept the
tools, and appended only user or tool messages; otherwise it is rendered in full and
starts a new segment of the trace. The episode is chosen when the answer is recorded, so
overlapping calls of one session never mix two conversations in one trace.

Each episode is one validated ``Trace`` (rollout id ``<session>#<n>``), also written to
``trace_dir/<session>.<n>.json`` after each call when a directory is given.

``stream=True`` answers with ``chat.completion.chunk`` server-sent events
(``mmref.client.sse``). Generation is not incremental: the whole answer is sampled, then
sent as chunks. Errors are OpenAI-shaped JSON, streaming or not: 400 for a bad request
(SDKs do not retry it), 502 for a failing inference server, 503 for an unreachable one.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmref.client import sse
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
from mmref.renderers.messages import Message, TextPart, parse_messages
from mmref.renderers.render import RenderedTokens
from mmref.renderers.store import ImageStore


@dataclass(frozen=True)
class Call:
    """One answered call: what was sent, what was sampled, and the reply returned."""

    request: list[Message]          # the call's messages, parsed (what continuation compares)
    messages: list[dict[str, Any]]  # the call's messages (image parts as refs) + the reply
    reply: Message                  # the assistant message returned
    tools: Any
    prompt: RenderedTokens
    completion_ids: list[int]

    def continued_by(self, request: list[Message]) -> bool:
        """Whether ``request`` resends this call's messages and appends to them."""
        n = len(self.request)
        return len(request) > n and request[:n] == self.request

    def bridge(self, renderer: Any, request: list[Message], tools: Any) -> RenderedTokens | None:
        """The next prompt as this prompt + completion verbatim + the new messages; None: render in full."""
        n = len(self.request)
        if not self.continued_by(request) or len(request) < n + 2 or tools != self.tools:
            return None
        if not _same_reply(request[n], self.reply):  # an edited reply: the sampled tokens are not the history
            return None
        return renderer.bridge_to_next_turn(self.prompt.token_ids, self.completion_ids, request[n + 1:],
                                            self.prompt.images, tools=tools, prev=self.prompt)


@dataclass
class Episode:
    """One conversation: each call's messages start with the previous call's messages."""

    nodes: list[TraceNode]
    last: Call


@dataclass
class Session:
    """One agent's episodes (the last one is the current conversation)."""

    id: str
    episodes: list[Episode] = field(default_factory=list)

    def record(self, call: Call, node: TraceNode) -> int:
        """Append the call to the current episode when it continues it, else start one; the episode index."""
        if self.episodes and self.episodes[-1].last.continued_by(call.request):
            self.episodes[-1].nodes.append(node)
            self.episodes[-1].last = call
        else:
            self.episodes.append(Episode([node], call))
        return len(self.episodes) - 1

    def trace(self, renderer: Any, episode: int = -1, reward: float = 0.0, group_id: str | None = None) -> Trace:
        """One episode's validated trace (the current one by default)."""
        index = range(len(self.episodes))[episode]
        chosen = self.episodes[index]
        return Trace.build(rollout_id=f"{self.id}#{index}", group_id=group_id, family=renderer.family,
                           image_pad_id=renderer.image_pad_id, stop_token_ids=renderer.stop_token_ids,
                           messages=chosen.last.messages, nodes=chosen.nodes, reward=reward)

    def traces(self, renderer: Any) -> list[Trace]:
        return [self.trace(renderer, i) for i in range(len(self.episodes))]


@dataclass(frozen=True)
class SamplingOverride:
    """What a training run imposes on an agent session's calls.

    ``temperature`` and ``top_p`` replace the agent's values; ``max_tokens`` caps them. A field
    left ``None`` keeps what the agent asks for.
    """

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def apply(self, sampling: Sampling) -> Sampling:
        return replace(sampling,
                       temperature=sampling.temperature if self.temperature is None else self.temperature,
                       top_p=sampling.top_p if self.top_p is None else self.top_p,
                       max_tokens=min(sampling.max_tokens, self.max_tokens or sampling.max_tokens))


@dataclass(frozen=True)
class ChatRequest:
    """The parts of an OpenAI chat request that mmref reads."""

    messages: list[Any]
    tools: Any
    sampling: Sampling
    stream: bool
    include_usage: bool

    @classmethod
    def parse(cls, body: Any) -> ChatRequest:
        """Raises ``ValueError`` naming the bad field."""
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ValueError("'messages' must be a non-empty list")
        stream, options = body.get("stream"), body.get("stream_options")
        if not isinstance(stream, bool | None):
            raise ValueError(f"'stream' must be true or false, got {stream!r}")
        if options is not None and (not isinstance(options, dict)
                                    or not isinstance(options.get("include_usage"), bool | None)):
            raise ValueError(f"'stream_options' must be an object like {{'include_usage': true}}, got {options!r}")
        sampling = Sampling(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                            max_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or 256),
                            seed=body.get("seed"))
        return cls(body["messages"], body.get("tools"), sampling, bool(stream),
                   bool(stream and options and options.get("include_usage")))


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
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    }}}}}}


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def create_interception_app(renderer: Any, client: TrainClient, store: ImageStore, model_name: str = "mmref",
                            trace_dir: str | Path | None = None) -> FastAPI:
    """The interception app; ``app.state.sessions`` maps each session id to its ``Session``.

    ``app.state.overrides`` maps a session id to the ``SamplingOverride`` its calls get (a
    training run's sampling); sessions not in it sample as their calls ask.
    """
    app = FastAPI(title="mmref interception")
    if trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
    sessions: dict[str, Session] = {}
    overrides: dict[str, SamplingOverride] = {}
    app.state.sessions, app.state.overrides = sessions, overrides

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405
        return openai_error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "mmref"}]}

    @app.post("/v1/chat/completions", openapi_extra=CHAT_REQUEST_SCHEMA)
    async def chat(request: Request) -> Any:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return await _complete(request, key or "default")

    @app.post("/sessions/{session_id}/v1/chat/completions", openapi_extra=CHAT_REQUEST_SCHEMA)
    async def chat_in_session(session_id: str, request: Request) -> Any:
        return await _complete(request, session_id)

    @app.get("/sessions/{session_id}/trace")
    async def trace(session_id: str) -> JSONResponse:
        if session_id not in sessions:
            return openai_error(404, f"no session {session_id!r}; sessions: {sorted(sessions)[:20]}",
                                "invalid_request_error")
        traces = sessions[session_id].traces(renderer)
        return JSONResponse({"session": session_id, "traces": [t.model_dump(mode="json") for t in traces]})

    async def _complete(http: Request, session_id: str) -> Any:
        try:
            body = await http.json()
        except ValueError:
            return openai_error(400, "request body is not JSON", "invalid_request_error")
        current = sessions[session_id].episodes[-1].last if session_id in sessions else None
        try:
            request = ChatRequest.parse(body)
            if session_id in overrides:
                request = replace(request, sampling=overrides[session_id].apply(request.sampling))
            messages, _ = prepare_images(request.messages, store, renderer.spec)
            parsed = parse_messages(messages)
            rendered = current.bridge(renderer, parsed, request.tools) if current is not None else None
            if rendered is None:
                rendered = renderer.render(parsed, tools=request.tools)
            result = await client.generate(rendered, request.sampling)
        except InferenceUnavailableError as exc:  # before MMRefError: these are client errors too
            return openai_error(503, str(exc), "server_error")
        except InferenceServerError as exc:
            return openai_error(502, str(exc), "server_error")
        except InferenceRequestError as exc:
            return openai_error(400, f"inference server refused the request: {exc}", "invalid_request_error")
        except (ImageInputError, MMRefError, TraceError, ValueError, TypeError) as exc:
            return openai_error(400, str(exc), "invalid_request_error")
        try:  # an answer that cannot be read or recorded is the inference server's fault, not the agent's
            answer, call, node = _answer(renderer, model_name, request, parsed, messages, rendered, result)
        except (MMRefError, ValueError, TypeError, OverflowError) as exc:
            return openai_error(502, f"the inference server's answer cannot be used: {exc}", "server_error")
        session = sessions.setdefault(session_id, Session(session_id))
        episode = session.record(call, node)
        if trace_dir is not None:
            _write_trace(Path(trace_dir), session_id, episode, session.trace(renderer, episode))
        if request.stream:
            return StreamingResponse(sse.events(answer, request.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(answer)

    return app


def _answer(renderer: Any, model_name: str, request: ChatRequest, parsed: list[Message],
            messages: list[dict[str, Any]], rendered: RenderedTokens, result: Any) -> tuple[dict, Call, TraceNode]:
    """The ``chat.completion``, the call and its trace node, checked as a one-call trace before any is kept.

    Raises ``ValueError`` (``TraceError``), ``TypeError`` or ``OverflowError`` for an answer that
    does not decode or record (ids outside the vocabulary, misaligned logprobs, an image pad sampled).
    """
    completion = result.completions[0]
    answer = _chat_response(model_name, renderer.parse_response(completion.token_ids), completion, rendered)
    reply = answer["choices"][0]["message"]
    call = Call(parsed, messages + [reply], Message.model_validate(reply), request.tools, rendered,
                completion.token_ids)
    node = TraceNode(prompt_ids=rendered.token_ids, completion_ids=completion.token_ids,
                     completion_logprobs=completion.logprobs, images=rendered.images,
                     num_messages=len(messages), finish_reason=completion.finish_reason,
                     weight_version=result.weight_version, temperature=request.sampling.temperature)
    # Every episode's trace then validates: its calls' messages are prefixes of its last call's.
    Trace.build(rollout_id="check", family=renderer.family, image_pad_id=renderer.image_pad_id,
                stop_token_ids=renderer.stop_token_ids, messages=call.messages, nodes=[node])
    return answer, call, node


def _write_trace(directory: Path, session_id: str, episode: int, trace: Trace) -> None:
    """``<session>.<episode>.json``, replaced atomically; session ids that are not safe file names are hex-encoded."""
    name = session_id if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", session_id) else session_id.encode().hex()
    tmp = directory / f".{name}.{episode}.json.tmp"
    tmp.write_text(trace.to_json())
    tmp.replace(directory / f"{name}.{episode}.json")


def _same_reply(echo: Message, reply: Message) -> bool:
    """Whether the agent echoed the reply as returned: same text and tool calls (ids and null fields aside)."""
    def text(m: Message) -> str | None:
        parts = m.parts
        return "".join(p.text for p in parts) if all(isinstance(p, TextPart) for p in parts) else None

    def calls(m: Message) -> list[tuple[str, Any]]:
        return [(c.function.name, _arguments(c.function.arguments)) for c in m.tool_calls]

    return echo.role == "assistant" and text(echo) == text(reply) and calls(echo) == calls(reply)


def _arguments(arguments: Any) -> Any:
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


def _chat_response(model: str, parsed: Any, completion: Any, rendered: Any) -> dict[str, Any]:
    tool_calls = [{"id": f"call_{uuid.uuid4().hex[:8]}", "type": "function",
                   "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                  for c in parsed.tool_calls if c.status == "ok" and isinstance(c.name, str)]
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
