"""Schemathesis against the OpenAPI schemas of the inference and interception servers.

Every operation gets schema-valid (positive) and schema-violating (negative) requests.
Each response must be a non-5xx, and every 4xx body a well-formed error object. The
example count per operation and mode is ``MMREF_FUZZ_EXAMPLES`` (CI runs the default).
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from schemathesis import GenerationMode

from inference_cases import app_and_store, served
from mmref.client.interception import create_interception_app
from mmref.client.train_client import TrainClient
from mmref.renderers import ImageStore
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer

EXAMPLES = int(os.environ.get("MMREF_FUZZ_EXAMPLES", "25"))
MAX_MODEL_LEN = 256  # bounds the work of one request, as `mmref serve --max-model-len` does


def fuzz(app, error_fields: tuple[str, ...], valid: dict[str, dict] | None = None) -> dict[str, int]:
    """Run every operation of ``app``'s schema in both modes; the status counts seen.

    ``valid`` maps "METHOD path" to the arguments of one known-good ``Case``: it is always
    tried first, so the success path is exercised whatever the generator draws (operations
    are visited in schema order, so a session is created before its trace is read).
    """
    valid = valid or {}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: dict[str, int] = {}
    for operation in (result.ok() for result in schema.get_all_operations()):
        # Negative cases need something to break: a body or parameters (the POSTs here).
        for mode in GenerationMode if operation.method.upper() == "POST" else [GenerationMode.POSITIVE]:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call(timeout=120)  # n=256 x max_model_len is slow, not hung
                assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
                key = f"{case.method} {case.path} {response.status_code}"
                statuses[key] = statuses.get(key, 0) + 1
                if response.status_code >= 400:
                    error = response.json()["error"]
                    assert all(isinstance(error[f], str) and error[f] for f in error_fields), response.text[:300]
            known = valid.get(f"{operation.method.upper()} {operation.path}")
            (example(case=operation.Case(**known))(check) if known is not None else check)()
    return statuses


@pytest.mark.timeout(900)
def test_inference_server_under_schemathesis():
    app, _ = app_and_store(served(max_model_len=MAX_MODEL_LEN))
    valid = {"POST /inference/v1/generate": {"body": {"token_ids": [1, 2, 3], "sampling": {"max_tokens": 4}}}}
    statuses = fuzz(app, ("message", "type"), valid)
    assert any(key.startswith("POST /inference/v1/generate 200") for key in statuses), statuses
    assert any(key.startswith("POST /inference/v1/generate 400") for key in statuses), statuses


@pytest.mark.timeout(900)
def test_interception_server_under_schemathesis(tmp_path):
    inference, _ = app_and_store(served(max_model_len=MAX_MODEL_LEN))
    client = TrainClient("http://inference", transport=httpx.ASGITransport(app=inference), max_retries=0)
    renderer = create_renderer(qwen2_tokenizer(), "qwen2-vl", spec=inference.state.served.spec)
    chat = {"body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}
    valid = {"POST /v1/chat/completions": chat,
             "POST /sessions/{session_id}/v1/chat/completions": {**chat, "path_parameters": {"session_id": "s1"}},
             "GET /sessions/{session_id}/trace": {"path_parameters": {"session_id": "s1"}}}
    statuses = fuzz(create_interception_app(renderer, client, ImageStore(tmp_path)), ("message", "type"), valid)
    assert any(" 200" in key and "chat/completions" in key for key in statuses), statuses
    assert any(" 400" in key and "chat/completions" in key for key in statuses), statuses
    assert "GET /sessions/{session_id}/trace 200" in statuses, statuses  # s1's trace, recorded above
