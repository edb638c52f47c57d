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
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 16) -> None:
        self.base_url, self.max_retries, self.backoff_s = base_url.rstrip("/"), max_retries, backoff_s
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=transport, limits=limits)
        self._max_model_len: int | None = None
        self._models_lock = asyncio.Lock()
        self.requests = 0
        self.retries = 0
        self.bytes_sent = 0

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
        data = (await self._request("POST", "/inference/v1/generate", json=body)).json()
        completions = [Completion(c["token_ids"], c["logprobs"], c["finish_reason"]) for c in data["choices"]]
        if len(completions) != sampling.n:
            raise InferenceServerError(f"inference server answered {len(completions)} completions for n={sampling.n}",
                                       status=None)
        return GenerateResult(completions, int(data.get("weight_version", 0)))

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
            if response.status_code >= 500:
                raise InferenceServerError(f"inference server failed on {path} (HTTP {response.status_code}): "
                                           f"{message}", status=response.status_code)
            raise InferenceRequestError(f"inference server refused {path} (HTTP {response.status_code}): {message}",
                                        status=response.status_code)
        raise InferenceUnavailableError(f"inference server at {self.base_url} unavailable for {path} after "
                                        f"{self.max_retries + 1} attempts; last error: {last}")


def _server_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]
