"""The policy a run starts from: tokenizer, model and layout spec from ``[model]``, and the device.

    tokenizer, model, spec = build_policy(config, vocabulary_of(source))
    device = pick_device(config)      # "cuda" when present under device = "auto"

``mmref rl``, ``mmref sft`` and ``mmref eval`` build their policy here.
"""

from __future__ import annotations

import torch

from mmref.client.environment import Vocabulary
from mmref.renderers import layout_spec
from mmref.trainer.checkpoint import load_weights_into
from mmref.trainer.models import TinySize, build_tiny_model
from mmref.trainer.run_config import RunConfig
from mmref.trainer.task_tokenizer import task_tokenizer


def build_policy(config: RunConfig, vocabulary: Vocabulary | None):
    """The tokenizer (of the task's ``vocabulary``), the tiny model whose special ids match it, and the layout spec."""
    tokenizer = task_tokenizer(vocabulary)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    size = TinySize(hidden_size=config.model.hidden_size, num_layers=config.model.num_layers,
                    vision_depth=config.model.vision_depth)
    model = build_tiny_model(config.model.family, seed=config.model.seed, vocab_size=len(tokenizer), size=size,
                             token_ids=ids)
    if config.model.path:  # a warm start (e.g. from `mmref sft`) of this same architecture
        load_weights_into(model, config.model.path)
    spec = layout_spec(config.model.family, min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels)
    return tokenizer, model, spec


def pick_device(config: RunConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device
