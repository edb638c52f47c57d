"""Shared helpers for inference tests: a served tiny model, its store, and request builders."""

from __future__ import annotations

import httpx
from PIL import Image

from mmref.renderers import ImageStore, make_ref
from mmref.trainer.inference import create_app, load_served_model

PAD, START, END = 151655, 151652, 151653
MAX_PIXELS = 128 * 128


def served(family: str = "qwen2-vl", max_model_len: int | None = None):
    return load_served_model(f"tiny-{family}", max_pixels=MAX_PIXELS, max_model_len=max_model_len)


def picture(index: int, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, ((61 * index) % 256, (17 * index) % 256, 120))


def prompt_with_images(refs) -> tuple[list[int], list[dict]]:
    """A chat-shaped prompt holding each ref's pads, and the matching wire slots."""
    ids, slots = [151644, 872, 198], []
    for ref in refs:
        ids.append(START)
        slots.append({"ref": ref.encode(), "offset": len(ids), "length": ref.num_tokens})
        ids += [PAD] * ref.num_tokens + [END]
    ids += [3838, 374, 432, 30, 151645, 198, 151644, 77091, 198]
    return ids, slots


def stored_refs(served_model, store: ImageStore, count: int, size=(64, 48)):
    return [make_ref(served_model.spec, store.put_image(picture(i, size))) for i in range(count)]


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mmref.test", timeout=60)


def app_and_store(served_model, cache_bytes: int = 64 * 2**20):
    store = ImageStore("memory://inference-" + str(id(served_model)))
    return create_app(served_model, store, cache_bytes=cache_bytes), store
