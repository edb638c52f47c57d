"""Shared helpers for inference tests: a served tiny model, its store, and request builders."""

from __future__ import annotations

import asyncio

import httpx
import torch
from PIL import Image

from mmref.renderers import ImageStore, layout_spec, make_ref
from mmref.renderers.refs import ImageSlot, parse_ref
from mmref.trainer.forward import forward_row, rope_index_of
from mmref.trainer.inference import create_app, load_served_model
from mmref.trainer.materialize import Materializer
from mmref.trainer.models import KIMI_VISION_TOKEN_IDS, QWEN_VISION_TOKEN_IDS, image_token_ids_of
from mmref.trainer.pack import pack
from mmref.trainer.samples import TrainingSample

PAD, START, END = 151655, 151652, 151653
MAX_PIXELS = 128 * 128


def served(family: str = "qwen2-vl", max_model_len: int | None = None):
    """The tiny model of ``family``; small images (Kimi's navit resize has no pixel limit: its defaults)."""
    max_pixels = MAX_PIXELS if layout_spec(family).resize == "smart" else None
    return load_served_model(f"tiny-{family}", max_pixels=max_pixels, max_model_len=max_model_len)


def picture(index: int, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, ((61 * index) % 256, (17 * index) % 256, 120))


def vision_ids(family: str) -> dict[str, int]:
    """The tiny ``family`` model's vision special-token ids (its config keys)."""
    return KIMI_VISION_TOKEN_IDS if family == "kimi-k2.5" else QWEN_VISION_TOKEN_IDS


def prompt_with_images(refs, family: str | None = None) -> tuple[list[int], list[dict]]:
    """A chat-shaped prompt holding each ref's pads, and the matching wire slots (the refs' family's ids)."""
    tokens = vision_ids(family or (refs[0].family if refs else "qwen2-vl"))
    ids, slots = [151644, 872, 198], []
    for ref in refs:
        ids.append(tokens["vision_start_token_id"])
        slots.append({"ref": ref.encode(), "offset": len(ids), "length": ref.num_tokens})
        ids += [tokens["image_token_id"]] * ref.num_tokens + [tokens["vision_end_token_id"]]
    ids += [3838, 374, 432, 30, 151645, 198, 151644, 77091, 198]
    return ids, slots


def stored_refs(served_model, store: ImageStore, count: int, size=(64, 48)):
    return [make_ref(served_model.spec, store.put_image(picture(i, size))) for i in range(count)]


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mmref.test", timeout=60)


def app_and_store(served_model, cache_bytes: int = 64 * 2**20):
    store = ImageStore("memory://inference-" + str(id(served_model)))
    return create_app(served_model, store, cache_bytes=cache_bytes), store


def generate(app, ids, slots, **sampling):
    async def call():
        async with client(app) as c:
            return await c.post("/inference/v1/generate", json={"token_ids": ids, "images": slots, "sampling": sampling})
    return asyncio.run(call())


def teacher_forced(model, store, ids, slots, completion, temperature=1.0):
    """The trainer's logprobs of ``completion`` after prompt ``ids`` sampled at ``temperature`` (teacher-forced)."""
    tokens = ids + completion
    n = len(tokens)
    refs = [parse_ref(s["ref"]) for s in slots]
    hf_model = model.engine.model
    sample = TrainingSample(model.family, tokens, [i >= len(ids) for i in range(n)], [0.0] * n, [0.0] * n,
                            [ImageSlot(ref=r, offset=s["offset"], length=s["length"]) for r, s in zip(refs, slots)],
                            hf_model.config.image_token_id, temperature=temperature)
    row = Materializer(store, model.spec, model.processor).materialize(pack([sample], 10**6))[0]
    with torch.no_grad():
        out = forward_row(hf_model, row, rope_index_of(hf_model), image_token_ids_of(hf_model), model.spec.merge_size)
    return out.logprobs[len(ids) - 1:]
