"""The inference server: FastAPI app over an engine, the image store and the feature cache.

| endpoint                     | does                                                        |
|------------------------------|-------------------------------------------------------------|
| POST /inference/v1/generate  | validate refs, load features (cached), sample, logprobs     |
| POST /inference/v1/generate_batch | several generate requests, sampled together, one result each |
| GET  /v1/models              | the served model: fingerprint, identity, engine, version    |
| POST /update_weights         | load a checkpoint directory; returns the new weight version |
| GET  /health                 | liveness, weight version, engine seconds and batches        |
| GET  /metrics                | Prometheus text                                             |

Bad input is a 4xx with ``{"error": {"message", "type", "detail"}}``; never a 500.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import nullcontext

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmref.renderers.errors import AssetNotFoundError, MMRefError
from mmref.renderers.store import ImageStore
from mmref.trainer.inference.api import GenerateBatchRequest, GenerateRequest, GenerateResponse, UpdateWeightsRequest
from mmref.trainer.inference.feature_cache import FeatureCache
from mmref.trainer.inference.metrics import ServerMetrics
from mmref.trainer.inference.serving import ServedModel
from mmref.trainer.inference.validate import RequestError, validate_request
from mmref.trainer.pixels import decoded_image, process_pixels


ENGINE_COUNTERS = ("generate_s", "batches", "load_s")  # cumulative, reported by GET /health


def error_body(message: str, kind: str, detail: dict | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "detail": detail or {}}}


def error_response(status: int, message: str, kind: str, detail: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, detail), status_code=status)


def create_app(served: ServedModel, store: ImageStore, cache_bytes: int = 512 * 2**20) -> FastAPI:
    """The server app (run it with uvicorn)."""
    app = FastAPI(title="mmref inference server")
    cache, metrics = FeatureCache(cache_bytes, store, served.spec), ServerMetrics()
    app.state.served, app.state.cache, app.state.metrics = served, cache, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unparsable body, 404, 405
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    async def answer(body: GenerateRequest) -> tuple[int, dict]:
        """One generate request's status and JSON body; bad input is a 4xx, an engine fault a 500."""
        start = time.perf_counter()
        try:
            with getattr(served.engine, "arriving", nullcontext)():  # lets the engine batch this request
                response = await _generate(served, cache, body)
            metrics.tokens_generated += sum(len(c.token_ids) for c in response.choices)
            status, payload = 200, response.model_dump()
        except RequestError as exc:
            status, payload = exc.status, error_body(str(exc), exc.kind, exc.detail)
        except AssetNotFoundError as exc:
            status, payload = 400, error_body(str(exc), "image_not_found")
        except MMRefError as exc:
            status, payload = 400, error_body(str(exc), "invalid_image")
        except Exception as exc:  # an engine fault: the server stays up and says what broke
            status, payload = 500, error_body(f"engine error: {type(exc).__name__}: {exc}", "server_error")
        metrics.observe(status, time.perf_counter() - start)
        return status, payload

    @app.post("/inference/v1/generate")
    async def generate(body: GenerateRequest) -> JSONResponse:
        status, payload = await answer(body)
        return JSONResponse(payload, status_code=status)

    @app.post("/inference/v1/generate_batch")
    async def generate_batch(body: GenerateBatchRequest) -> JSONResponse:
        # Concurrently: the engine sees every request at once and samples them as one batch.
        results = await asyncio.gather(*(answer(request) for request in body.requests))
        return JSONResponse({"results": [{"status": status, "body": payload} for status, payload in results]})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "owned_by": "mmref",
                                            "family": served.family, "fingerprint": served.spec.fingerprint,
                                            "max_model_len": served.engine.max_model_len,
                                            "weight_version": served.engine.weight_version,
                                            "identity": served.identity,
                                            "engine": getattr(served.engine, "name", "transformers")}]}

    @app.post("/update_weights")
    async def update_weights(body: UpdateWeightsRequest) -> JSONResponse:
        try:
            version = await served.engine.update_weights(body.path)
        except (OSError, ValueError) as exc:  # missing, unreadable or unnameable path (ENAMETOOLONG): the caller's
            return error_response(400, f"cannot load a checkpoint from {body.path[:200]!r}: {type(exc).__name__}: "
                                       f"{str(exc)[:300]}", "invalid_checkpoint")
        except Exception as exc:  # an engine fault: a JSON error naming it, never a bare 500
            return error_response(500, f"weight update failed: {type(exc).__name__}: {exc}", "server_error")
        cache_note = "features stay valid: they depend on the processor, not on the weights"
        return JSONResponse({"weight_version": version, "note": cache_note})

    @app.get("/health")
    async def health() -> dict:
        engine = served.engine  # seconds and batches: what a remote orchestrator times its steps with
        return {"status": "ok", "weight_version": engine.weight_version,
                **{key: getattr(engine, key) for key in ENGINE_COUNTERS if hasattr(engine, key)}}

    @app.get("/metrics")
    async def metrics_page() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(cache.stats, cache.bytes, served.engine.weight_version))

    return app


async def _generate(served: ServedModel, cache: FeatureCache, body: GenerateRequest) -> GenerateResponse:
    slots = validate_request(body, served.spec, served.image_pad_id, served.engine.max_model_len,
                             served.engine.vocab_size)

    # The cache reads and hash-verifies the bytes, and hands over the ref they make (``actual``).
    if served.engine.input_kind == "images":  # the engine processes pixels itself (vLLM), already sized
        def compute(data, actual):
            return decoded_image(data, actual, served.processor)
    else:
        def compute(data, actual):
            return process_pixels(data, actual, served.processor, stage="inference server")

    features = await asyncio.gather(*(cache.get(s.ref, compute) for s in slots))
    types = [0] * len(body.token_ids)
    for slot in slots:
        types[slot.offset:slot.end] = [1] * slot.length
    choices = await served.engine.generate(body.token_ids, list(features), types, body.sampling,
                                           [s.ref.sha256 for s in slots])
    return GenerateResponse(choices=choices, weight_version=served.engine.weight_version)
