"""Async client of the inference server: rendered tokens and image slots in, completions out.

Connection errors and 503s are retried a bounded number of times with exponential backoff;
a 4xx is never retried and surfaces the server's message. The prompt length is checked up
front against the server's ``max_model_len`` (read once from ``/v1/models``). A response
with another number of completions than the ``n`` asked for is an ``InferenceServerError``.

Connections are capped at ``max_connections`` and every one is kept alive (httpx keeps only
20 idle by default, so 64 concurrent rollouts closed and reopened 44 connections per wave).
16 rather than 64: httpcore scans every connection of its pool on each request and release,
and the in-process server serves one batch at a time anyway; a learnability step's 32 group
requests (1 thread per role) collected in 0.44 s over 16 connections, 0.7-0.9 s over 32 or 64.

With ``batch=True`` the generate calls made in the same pass of the event loop (a step's
group requests, started together) go out as one ``/inference/v1/generate_batch`` request;
each call still gets its own completions or its own typed error. One request instead of 32
spares the client's connection pool and the server's per-request HTTP work.

    async with TrainClient("http://127.0.0.1:8000") as client:
        result = await client.generate(rendered, Sampling(max_tokens=32, n=8))
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from mmref.client.errors import InferenceRequestError, InferenceServerError, InferenceUnavailableError

RETRYABLE_STATUS = frozenset({502, 503, 504})


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters as the server takes them."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """One sampled completion."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass(frozen=True)
class GenerateResult:
    completions: list[Completion]
    weight_version: int


class TrainClient:
    """The client rollouts use to sample from the inference server."""

    def __init__(self, base_url: str, *, max_retries: int = 4, backoff_s: float = 0.2, timeout_s: float = 300.0,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 16,
                 batch: bool = False, max_batch: int = 256) -> None:
        self.base_url, self.max_retries, self.backoff_s = base_url.rstrip("/"), max_retries, backoff_s
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=transport, limits=limits)
        self._max_model_len: int | None = None
        self._models_lock = asyncio.Lock()
        self.requests = 0
        self.retries = 0
        self.bytes_sent = 0
        self.batch, self.max_batch = batch, max_batch
        self._waiting: list[tuple[dict, asyncio.Future]] = []  # generate bodies for the next batch request
        self._flushes: set[asyncio.Task] = set()

    async def __aenter__(self) -> TrainClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def max_model_len(self) -> int:
        """The served model's context length (one ``/v1/models`` call, however many requests wait for it)."""
        async with self._models_lock:
            if self._max_model_len is None:
                models = (await self._request("GET", "/v1/models")).json()
                self._max_model_len = int(models["data"][0]["max_model_len"])
        return self._max_model_len

    async def generate(self, rendered: Any, sampling: Sampling) -> GenerateResult:
        """Sample completions of a rendered prompt (``RenderedTokens`` or anything with token_ids/images)."""
        limit = await self.max_model_len()
        needed = len(rendered.token_ids) + sampling.max_tokens
        if needed > limit:
            raise InferenceRequestError(f"prompt of {len(rendered.token_ids)} tokens + max_tokens {sampling.max_tokens} "
                                        f"exceeds the server's max_model_len {limit}", status=None)
        body = {"token_ids": list(rendered.token_ids), "images": [s.model_dump(mode="json") for s in rendered.images],
                "sampling": asdict(sampling)}
        if self.batch:
            data = await self._batched(body)
        else:
            data = (await self._request("POST", "/inference/v1/generate", json=body)).json()
        completions = [Completion(c["token_ids"], c["logprobs"], c["finish_reason"]) for c in data["choices"]]
        if len(completions) != sampling.n:
            raise InferenceServerError(f"inference server answered {len(completions)} completions for n={sampling.n}",
                                       status=None)
        return GenerateResult(completions, int(data.get("weight_version", 0)))

    async def _batched(self, body: dict) -> dict:
        """``body``'s generate response, sent in the next batch request."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((body, future))
        if len(self._waiting) == 1:
            self._schedule_flush()
        return await future

    def _schedule_flush(self) -> None:
        task = asyncio.create_task(self._flush())
        self._flushes.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        """Gather calls while each pass of the loop brings more, then send them as one request."""
        while len(self._waiting) < self.max_batch:
            arrived = len(self._waiting)
            await asyncio.sleep(0)
            if len(self._waiting) == arrived:
                break
        batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        if self._waiting:
            self._schedule_flush()
        path = "/inference/v1/generate_batch"
        try:
            response = await self._request("POST", path, json={"requests": [b for b, _ in batch]})
            results = _batch_results(response, len(batch))
        except Exception as exc:  # noqa: BLE001 - every call of the batch gets the failure
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            elif result[0] < 400:
                future.set_result(result[1])
            else:
                future.set_exception(_status_error(path, result[0], _error_message(result[1], str(result[1]))))

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connect/read/write errors and every timeout
                last = f"{type(exc).__name__}: {exc}"
                continue
            self.requests += 1
            if response.request.content:
                self.bytes_sent += len(response.request.content)
            if response.status_code < 400:
                return response
            message = _server_message(response)
            if response.status_code in RETRYABLE_STATUS:
                last = f"HTTP {response.status_code}: {message}"
                continue
            raise _status_error(path, response.status_code, message)
        raise InferenceUnavailableError(f"inference server at {self.base_url} unavailable for {path} after "
                                        f"{self.max_retries + 1} attempts; last error: {last}")


def _batch_results(response: httpx.Response, size: int) -> list[tuple[int, Any]]:
    """``(status, body)`` per request of a batch; ``InferenceServerError`` if the answer is not that."""
    try:
        results = [(int(r["status"]), r["body"]) for r in response.json()["results"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InferenceServerError(f"inference server's batch answer is malformed ({type(exc).__name__}: {exc})",
                                   status=None) from None
    if len(results) != size:
        raise InferenceServerError(f"inference server answered {len(results)} results for a batch of {size} "
                                   "requests", status=None)
    return results


def _status_error(path: str, status: int, message: str) -> InferenceServerError | InferenceRequestError:
    """The typed error of an HTTP error status: the server's fault (5xx) or the request's (4xx)."""
    if status >= 500:
        return InferenceServerError(f"inference server failed on {path} (HTTP {status}): {message}", status=status)
    return InferenceRequestError(f"inference server refused {path} (HTTP {status}): {message}", status=status)


def _server_message(response: httpx.Response) -> str:
    try:
        return _error_message(response.json(), response.text)
    except ValueError:
        return response.text[:500]


def _error_message(body: Any, fallback: str) -> str:
    try:
        return str(body["error"]["message"])
    except (KeyError, TypeError):
        return fallback[:500]
