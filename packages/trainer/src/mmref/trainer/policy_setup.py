"""The policy a run starts from: the model directory ``[model]`` names (or the tiny default), and the device.

    policy = build_policy(config, vocabulary_of(source))   # .tokenizer .model .spec .processor .family .path
    device = pick_device(config)      # "cuda" when present under device = "auto"

``mmref rl``, ``mmref sft`` and ``mmref eval`` build their policy here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmref.client.environment import Vocabulary
from mmref.renderers.layout import layout_spec
from mmref.trainer.models import TinySize
from mmref.trainer.policy import Policy, load_policy
from mmref.trainer.run_config import RunConfig
from mmref.trainer.task_tokenizer import task_tokenizer
from mmref.trainer.tiny_dir import write_tiny_model_dir

TASK_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}  # the tiny default's images: small, CPU-fast


def build_policy(config: RunConfig, vocabulary: Vocabulary | None) -> Policy:
    """The run's model directory loaded: ``model.path``, else the tiny default written into the run directory."""
    path = config.model.path or write_task_model_dir(config, vocabulary)
    return load_policy(path, min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels)


def write_task_model_dir(config: RunConfig, vocabulary: Vocabulary | None) -> Path:
    """``<output_dir>/model``: the tiny ``model.family`` model with the tokenizer of the task's ``vocabulary``."""
    family = config.model.family
    tokenizer = task_tokenizer(vocabulary, family)
    size = TinySize(hidden_size=config.model.hidden_size, num_layers=config.model.num_layers,
                    vision_depth=config.model.vision_depth)
    pixels = TASK_PIXELS if layout_spec(family).resize == "smart" else {}  # Kimi's navit resize: its defaults
    return write_tiny_model_dir(family, Path(config.output_dir) / "model", tokenizer=tokenizer,
                                seed=config.model.seed, size=size, **pixels)


def pick_device(config: RunConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device
