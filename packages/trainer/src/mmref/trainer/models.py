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
| qwen3.5     | Qwen3_5ForConditionalGeneration      | 16    | 0.5      |
| kimi-k2.5   | Kimi_K25ForConditionalGeneration     | 14    | 0.5      |

Qwen3.5 and Kimi K2.5 need a transformers that has ``transformers.models.qwen3_5`` and
``transformers.models.kimi_k25`` (5.x); without them those families are not offered.
Qwen3.5's text model is hybrid (gated delta net linear attention + full attention), which
runs on CPU through transformers' torch fallback; the tiny one has one layer of each kind.
Kimi K2.5 is MoonViT + a DeepSeek-V3 text model (MLA attention, MoE; plain 1-D RoPE, no
mRoPE); the tiny one has a dense layer then an MoE layer, and the Qwen2 vocabulary with
Kimi's special tokens (``mmref.renderers.tokenizer.kimi_tokenizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import (
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from mmref.renderers.layout import LayoutSpec, layout_spec, spec_from_image_processor
from mmref.renderers.processed import build_image_processor  # noqa: F401  (re-exported)
from mmref.renderers.tokenizer import KIMI_SPECIAL_TOKENS, KIMI_VIDEO_TOKEN, QWEN_FIRST_SPECIAL_ID
from mmref.trainer.errors import UnsupportedModelError

# Qwen2 tokenizer ids of the vision special tokens (shared by Qwen2-VL, 2.5-VL, 3-VL, 3.5).
QWEN_VISION_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656,
                         "vision_start_token_id": 151652, "vision_end_token_id": 151653}
QWEN_VOCAB_SIZE = 151_936
# config key -> the special token it names; a model directory's tokenizer must give these ids.
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
KIMI_VISION_TOKENS = {"image_token_id": "<|media_pad|>", "video_token_id": KIMI_VIDEO_TOKEN,
                      "vision_start_token_id": "<|media_begin|>", "vision_end_token_id": "<|media_end|>"}
# Their ids in ``kimi_tokenizer()`` (Kimi's specials, then the video token, from id 151643).
KIMI_VISION_TOKEN_IDS = {name: QWEN_FIRST_SPECIAL_ID + (*KIMI_SPECIAL_TOKENS, KIMI_VIDEO_TOKEN).index(token)
                         for name, token in KIMI_VISION_TOKENS.items()}

_CLASSES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}
# config.json ``model_type`` -> layout family, for every family mmref can train.
FAMILY_BY_MODEL_TYPE = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}
try:  # families whose classes only newer transformers releases have
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
except ImportError:  # pragma: no cover - depends on the installed transformers
    pass
else:
    _CLASSES["qwen3.5"] = (Qwen3_5Config, Qwen3_5ForConditionalGeneration)
    FAMILY_BY_MODEL_TYPE["qwen3_5"] = "qwen3.5"
try:
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration
except ImportError:  # pragma: no cover - depends on the installed transformers
    pass
else:
    _CLASSES["kimi-k2.5"] = (Kimi_K25Config, Kimi_K25ForConditionalGeneration)
    FAMILY_BY_MODEL_TYPE["kimi_k25"] = "kimi-k2.5"
TINY_FAMILIES: tuple[str, ...] = tuple(_CLASSES)


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
        raise ValueError(f"no tiny model for family {family!r} in transformers {transformers.__version__}; "
                         f"choose one of {list(TINY_FAMILIES)}")
    config_cls, _ = _CLASSES[family]
    token_ids = token_ids or (KIMI_VISION_TOKEN_IDS if family == "kimi-k2.5" else QWEN_VISION_TOKEN_IDS)
    if family == "kimi-k2.5":
        return config_cls(text_config=_tiny_kimi_text(vocab_size, size), vision_config=_tiny_kimi_vision(size),
                          projection_hidden_size=size.vision_hidden, tie_word_embeddings=True, **token_ids)
    text = _tiny_text(family, vocab_size, size)
    vision = _tiny_vision(family, size)
    tied = {"tie_word_embeddings": True} if family == "qwen3.5" else {}  # its config's own default is untied
    return config_cls(text_config=text, vision_config=vision, **tied, **token_ids)


def _tiny_kimi_text(vocab_size: int, size: TinySize) -> dict[str, Any]:
    """A tiny DeepSeek-V3 (MLA attention with a query LoRA as published; a dense layer, then MoE layers of
    4 experts, 2 per token). Without ``q_lora_rank`` the text ``q_proj`` would match transformers'
    Kimi weight conversion meant for the vision tower's ``attn.q_proj`` and not load back."""
    head_dim = size.hidden_size // size.num_heads
    return dict(model_type="deepseek_v3", vocab_size=vocab_size, hidden_size=size.hidden_size,
                intermediate_size=size.intermediate_size, moe_intermediate_size=size.intermediate_size // 4,
                num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
                num_key_value_heads=size.num_heads, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=2 * head_dim, kv_lora_rank=head_dim,
                qk_rope_head_dim=head_dim // 2, qk_nope_head_dim=head_dim // 2, v_head_dim=head_dim,
                max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                **_special_ids(vocab_size))


def _tiny_kimi_vision(size: TinySize) -> dict[str, Any]:
    """A tiny MoonViT with the published patch and merge sizes."""
    spec = layout_spec("kimi-k2.5")
    return dict(patch_size=spec.patch_size, merge_kernel_size=[spec.merge_size, spec.merge_size], pos_emb_height=16,
                pos_emb_width=16, pos_emb_time=4, num_attention_heads=size.vision_heads,
                num_hidden_layers=size.vision_depth, hidden_size=size.vision_hidden,
                intermediate_size=2 * size.vision_hidden)


def _special_ids(vocab_size: int) -> dict[str, None]:
    """No bos/eos/pad ids for a tiny tokenizer's vocabulary (Qwen's do not exist in it); the defaults otherwise."""
    return dict(bos_token_id=None, eos_token_id=None, pad_token_id=None) if vocab_size < QWEN_VOCAB_SIZE else {}


def _mrope(rotary_dim: int, interleaved: bool) -> dict[str, Any]:
    """Default rope with mRoPE sections (t, h, w) over half the rotary dims."""
    half = rotary_dim // 2
    rope = {"rope_type": "default", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    return rope | {"mrope_interleaved": True} if interleaved else rope


def _tiny_text(family: str, vocab_size: int, size: TinySize) -> dict[str, Any]:
    """The text-model part of a tiny config."""
    head_dim = size.hidden_size // size.num_heads
    text = dict(vocab_size=vocab_size, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
                num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
                num_key_value_heads=size.num_kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters=_mrope(head_dim, interleaved=family not in ("qwen2-vl", "qwen2.5-vl")),
                **_special_ids(vocab_size))
    if family in ("qwen3-vl", "qwen3.5"):
        text |= dict(head_dim=head_dim)
    if family == "qwen3.5":  # hybrid: linear attention then full attention, as the published 3:1 pattern ends
        partial = 0.5  # the published models rotate a quarter of a 256-dim head; half of a tiny one
        text["rope_parameters"] = _mrope(int(head_dim * partial), interleaved=True) | {"partial_rotary_factor": partial}
        text |= dict(layer_types=["linear_attention"] * (size.num_layers - 1) + ["full_attention"],
                     linear_num_key_heads=size.num_kv_heads, linear_num_value_heads=size.num_heads,
                     linear_key_head_dim=head_dim, linear_value_head_dim=head_dim)
    return text


def _tiny_vision(family: str, size: TinySize) -> dict[str, Any]:
    """The vision-tower part of a tiny config."""
    spec = layout_spec(family)
    vision = dict(depth=size.vision_depth, num_heads=size.vision_heads, patch_size=spec.patch_size,
                  spatial_merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size, in_channels=3)
    if family == "qwen2-vl":
        return vision | dict(embed_dim=size.vision_hidden, hidden_size=size.hidden_size, mlp_ratio=2)
    vision |= dict(hidden_size=size.vision_hidden, out_hidden_size=size.hidden_size,
                   intermediate_size=2 * size.vision_hidden)
    if family == "qwen2.5-vl":
        return vision | dict(fullatt_block_indexes=[size.vision_depth - 1],
                             window_size=spec.patch_size * spec.merge_size * 4)
    vision |= dict(num_position_embeddings=256)
    return vision | dict(deepstack_visual_indexes=[0]) if family == "qwen3-vl" else vision


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


def processor_spec(family: str, processor: Any) -> LayoutSpec:
    """The layout spec a live processor implements (its fingerprint is what refs must match)."""
    return spec_from_image_processor(family, processor)


def merge_size_of(model: PreTrainedModel) -> int:
    """Side of the patch square the vision tower merges into one token (Qwen-VL ``spatial_merge_size``,
    Kimi ``merge_kernel_size``)."""
    vision = model.config.vision_config
    size = getattr(vision, "spatial_merge_size", None) or vision.merge_kernel_size[0]
    return int(size)


def vision_tokens(family: str) -> dict[str, str]:
    """Config key -> the special token it names, for ``family``."""
    return KIMI_VISION_TOKENS if family == "kimi-k2.5" else VISION_TOKENS


def vision_token_ids(tokenizer: Any, family: str = "qwen2-vl") -> dict[str, int | None]:
    """The config's vision special-token ids as ``tokenizer`` has them (None where it lacks one)."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in vision_tokens(family).items()}
    return {name: None if i == tokenizer.unk_token_id else i for name, i in ids.items()}


def image_token_ids_of(model: PreTrainedModel) -> frozenset[int]:
    """Ids of every image special token of a model (never to be sampled)."""
    config = model.config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ids = {int(getattr(config, n)) for n in names if getattr(config, n, None) is not None}
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", 0)
    if family_of(model) != "kimi-k2.5" and vocab > 151_654:  # Qwen2 vocabulary: <|vision_pad|> too
        ids.add(151_654)
    return frozenset(ids)
