"""The embedded default model as a directory: ``mmref init tiny-qwen2-vl DIR``.

A tiny random-init model (``models.build_tiny_model``) written with a tokenizer, an image
processor config and the family's chat template, so the default and a real checkpoint go
through the same loader (``policy.load_policy``)::

    write_tiny_model_dir("qwen2-vl", "models/tiny")                      # the real Qwen2 vocabulary
    write_tiny_model_dir("qwen2-vl", "runs/x/model", tokenizer=tiny_tokenizer(words))  # a task-sized one

The vision special-token ids of the config are the tokenizer's, whatever its size. A family
whose published chat template this package does not ship (qwen3.5) is written without one:
mmref renders its prompts itself (``mmref.renderers``), the template only serves other tools.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from mmref.renderers.layout import layout_spec
from mmref.renderers.processed import build_image_processor
from mmref.renderers.render import CHAT_TEMPLATE_FILES, chat_template
from mmref.renderers.tokenizer import family_tokenizer
from mmref.trainer.export import export_model_dir
from mmref.trainer.models import QWEN_VOCAB_SIZE, TinySize, build_tiny_model, vision_token_ids

def write_tiny_model_dir(family: str, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                         seed: int = 0, size: TinySize = TinySize(), min_pixels: int | None = None,
                         max_pixels: int | None = None, max_shard_size: str | int = "2GB") -> Path:
    """Write a tiny random ``family`` model directory (deterministic for ``seed``) and return it.

    Without ``tokenizer`` it has the real Qwen2 vocabulary (``family_tokenizer``: with Kimi's special
    tokens for kimi-k2.5) and its size;
    pixel limits default to the family's published ones.
    """
    vocab_size = QWEN_VOCAB_SIZE if tokenizer is None else len(tokenizer)
    tokenizer = tokenizer or family_tokenizer(family)
    model = build_tiny_model(family, seed=seed, vocab_size=vocab_size, size=size,
                             token_ids=vision_token_ids(tokenizer, family))
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = build_image_processor(layout_spec(family, **pixels))
    template = chat_template(family) if family in CHAT_TEMPLATE_FILES else None
    return export_model_dir(model, tokenizer, processor, directory, chat_template=template,
                            max_shard_size=max_shard_size)
