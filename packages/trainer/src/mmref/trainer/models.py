"""Model and image-processor factories: tiny random-init Qwen-VL models from configs.

The embedded default of every command and test is a tiny model built here (no download):
``build_tiny_model("qwen2-vl")`` gives a ~1M-parameter Qwen2-VL whose special token ids
match the Qwen2 tokenizer. ``tiny_dir`` writes it as a model directory, and every model
(tiny or real) loads from a directory with ``policy.load_policy(path)``.

| family      | transformers class                   | patch | mean/std |
|-------------|--------------------------------------|-------|----------|
| qwen2-vl    | Qwen2VLForConditionalGeneration      | 14    | CLIP     |
| qwen2.5-vl  | Qwen2_5_VLForConditionalGeneration   | 14    | CLIP     |
| qwen3-vl    | Qwen3VLForConditionalGeneration      | 16    | 0.5      |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from mmref.renderers.layout import LayoutSpec, layout_spec, spec_from_image_processor
from mmref.renderers.processed import build_image_processor  # noqa: F401  (re-exported)
from mmref.trainer.errors import UnsupportedModelError

# Qwen2 tokenizer ids of the vision special tokens (shared by Qwen2-VL, 2.5-VL, 3-VL).
QWEN_VISION_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656,
                         "vision_start_token_id": 151652, "vision_end_token_id": 151653}
QWEN_VOCAB_SIZE = 151_936
# config key -> the special token it names; a model directory's tokenizer must give these ids.
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}

_CLASSES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}
TINY_FAMILIES: tuple[str, ...] = tuple(_CLASSES)
# config.json ``model_type`` -> layout family, for every family mmref can train.
FAMILY_BY_MODEL_TYPE = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}


@dataclass(frozen=True)
class TinySize:
    """Dimensions of a tiny model; the defaults run forward+backward on CPU in milliseconds."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden: int = 32
    vision_depth: int = 2
    vision_heads: int = 2


def tiny_config(family: str, vocab_size: int = QWEN_VOCAB_SIZE, size: TinySize = TinySize(),
                token_ids: dict[str, int] | None = None) -> Any:
    """Config of a tiny random model of ``family`` whose special ids match the tokenizer."""
    if family not in _CLASSES:
        raise ValueError(f"no tiny model for family {family!r}; choose one of {list(TINY_FAMILIES)}")
    config_cls, _ = _CLASSES[family]
    spec = layout_spec(family)
    head_dim = size.hidden_size // size.num_heads
    half = head_dim // 2  # mrope sections (t, h, w) cover half the head dim
    text = dict(vocab_size=vocab_size, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
                num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
                num_key_value_heads=size.num_kv_heads, max_position_embeddings=4096, tie_word_embeddings=True)
    if vocab_size < QWEN_VOCAB_SIZE:  # a tiny tokenizer: Qwen's bos/eos ids do not exist in its vocab
        text |= dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    vision = dict(depth=size.vision_depth, num_heads=size.vision_heads, patch_size=spec.patch_size,
                  spatial_merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size,
                  in_channels=3)
    if family == "qwen2-vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
        vision |= dict(embed_dim=size.vision_hidden, hidden_size=size.hidden_size, mlp_ratio=2)
    elif family == "qwen2.5-vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
        vision |= dict(hidden_size=size.vision_hidden, out_hidden_size=size.hidden_size,
                       intermediate_size=2 * size.vision_hidden, fullatt_block_indexes=[size.vision_depth - 1],
                       window_size=spec.patch_size * spec.merge_size * 4)
    else:
        text |= dict(head_dim=head_dim)
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
                                   "mrope_interleaved": True}
        vision |= dict(hidden_size=size.vision_hidden, out_hidden_size=size.hidden_size,
                       intermediate_size=2 * size.vision_hidden, num_position_embeddings=256,
                       deepstack_visual_indexes=[0])
    return config_cls(text_config=text, vision_config=vision, **(token_ids or QWEN_VISION_TOKEN_IDS))


def build_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: Any) -> PreTrainedModel:
    """A tiny random-init model of ``family`` (deterministic for a seed), in eval mode."""
    _, model_cls = _CLASSES[family] if family in _CLASSES else (None, None)
    config = tiny_config(family, **kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    model.config.mmref_family = family
    return model.eval()


def family_of(model: PreTrainedModel) -> str:
    """Layout family of a loaded model, from its config."""
    return getattr(model.config, "mmref_family", None) or family_of_model_type(model.config.model_type)


def family_of_model_type(model_type: str | None, where: str = "config.json") -> str:
    """Layout family of a config's ``model_type``; ``UnsupportedModelError`` for one mmref cannot train.

    >>> family_of_model_type("qwen2_5_vl")
    'qwen2.5-vl'
    """
    if model_type not in FAMILY_BY_MODEL_TYPE:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} has no trainable mmref family; "
                                    f"supported model types: {sorted(FAMILY_BY_MODEL_TYPE)}")
    return FAMILY_BY_MODEL_TYPE[model_type]


def processor_spec(family: str, processor: Qwen2VLImageProcessorPil) -> LayoutSpec:
    """The layout spec a live processor implements (its fingerprint is what refs must match)."""
    return spec_from_image_processor(family, processor)


def vision_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The config's vision special-token ids as ``tokenizer`` has them (None where it lacks one)."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in VISION_TOKENS.items()}
    return {name: None if i == tokenizer.unk_token_id else i for name, i in ids.items()}


def image_token_ids_of(model: PreTrainedModel) -> frozenset[int]:
    """Ids of every image special token of a Qwen-VL model (never to be sampled)."""
    config = model.config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ids = {int(getattr(config, n)) for n in names if getattr(config, n, None) is not None}
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", 0)
    if vocab > 151_654:  # Qwen2 vocabulary: <|vision_pad|> too
        ids.add(151_654)
    return frozenset(ids)
