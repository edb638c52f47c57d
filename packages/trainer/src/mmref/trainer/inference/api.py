"""Wire types of the inference server (JSON over HTTP).

    POST /inference/v1/generate
    {"token_ids": [...], "images": [{"ref": "mmref:v1:...", "offset": 17, "length": 64}],
     "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "stop_token_ids": [], "n": 1, "seed": null}}
    -> {"choices": [{"token_ids": [...], "logprobs": [...], "finish_reason": "stop"}], "weight_version": 0}

    POST /inference/v1/generate_batch     (several prompts in one HTTP request: a step's groups)
    {"requests": [<generate request>, ...]}
    -> {"results": [{"status": 200, "body": <generate response>}, {"status": 400, "body": {"error": ...}}, ...]}

Logprobs are of the sampled tokens under the sampling distribution with image special
tokens removed (``masked_log_softmax(logits / temperature)``; top-p truncation is not
folded in). Errors are ``{"error": {"message", "type", "detail"}}`` with a 4xx/5xx status.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1, le=65_536)
    stop_token_ids: list[int] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=256)
    seed: int | None = None


class WireSlot(BaseModel):
    """An image slot as sent: the ref string, first pad offset and pad count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = Field(max_length=4096)
    offset: int
    length: int


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    token_ids: list[int] = Field(min_length=1)
    images: list[WireSlot] = Field(default_factory=list)
    sampling: SamplingParams = SamplingParams()


class GenerateBatchRequest(BaseModel):
    """Generate requests answered together; each result carries the status its own request would get."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: list[GenerateRequest] = Field(min_length=1, max_length=1024)


class Choice(BaseModel):
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


class GenerateResponse(BaseModel):
    choices: list[Choice]
    weight_version: int


class UpdateWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str


class ErrorBody(BaseModel):
    message: str
    type: str
    detail: dict[str, Any] = Field(default_factory=dict)
