"""The model a run trains and serves: a Hugging Face directory, loaded with its tokenizer and image processor.

A model directory is what ``save_pretrained`` writes; the tiny default (``mmref init``), an
exported step and a downloaded Qwen-VL checkpoint look alike::

    model/
      config.json                   model_type -> layout family
      model.safetensors             or model.safetensors.index.json + its shards
      tokenizer.json  tokenizer_config.json  chat_template.jinja
      preprocessor_config.json      pixel limits, patch/merge sizes, mean/std -> the LayoutSpec

Every stage derives its layout spec from that processor config (plus the run's pixel
overrides), so refs carry the fingerprint of what the checkpoint really uses::

    >>> policy = load_policy("runs/x/model", max_pixels=112 * 112)   # doctest: +SKIP
    >>> policy.family, policy.spec.max_pixels                         # doctest: +SKIP
    ('qwen2-vl', 12544)

A missing part, a ``model_type`` mmref cannot train and a processor config the layout
math cannot reproduce are each a ``ModelDirError`` that names the file and the fix.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmref.renderers.layout import LayoutSpec, layout_spec, spec_from_image_processor
from mmref.renderers.processed import PROCESSOR_TYPES, build_image_processor, image_processor_class
from mmref.trainer.errors import IncompleteModelDirError, ModelDirError, ProcessorConfigError
from mmref.trainer.models import family_of_model_type, vision_token_ids, vision_tokens

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# Processor settings that decide pixels beyond the spec's own fields: the processor rebuilt
# from the derived spec (what the client and the vLLM engine use) must agree on each.
PIXEL_KEYS = ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "size",
              "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
# processor key -> vision_config key: the grid the processor makes must be the one the vision tower expects.
VISION_KEYS = {"patch_size": "patch_size", "merge_size": "spatial_merge_size",
               "temporal_patch_size": "temporal_patch_size"}


@dataclass(frozen=True)
class ModelDir:
    """A model directory checked without reading weights: its family, image processor and layout spec."""

    path: Path
    family: str
    processor: Any  # the family's PIL image processor, with the run's pixel overrides applied
    spec: LayoutSpec


@dataclass(frozen=True)
class Policy:
    """A model directory loaded: what every stage trains, serves and checks refs with."""

    path: Path
    family: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: Any
    spec: LayoutSpec


def inspect_model_dir(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None) -> ModelDir:
    """Check that ``path`` is a loadable, trainable model directory; cheap (weights are not read)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise IncompleteModelDirError(f"model directory {path} does not exist (expected a save_pretrained directory, "
                                      "e.g. one written by `mmref init tiny-qwen2-vl DIR`)")
    config = _read_json(_require(path, ("config.json",), "the model config"))
    family = family_of_model_type(config.get("model_type"), where=str(path / "config.json"))
    _check_weights(path)
    _require(path, TOKENIZER_FILES, "a tokenizer (save it with tokenizer.save_pretrained(DIR))")
    processor = _image_processor(path, family, config, min_pixels, max_pixels)
    return ModelDir(path, family, processor, spec_of(family, processor, path))


def load_policy(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None,
                dtype: torch.dtype = torch.float32, tokenizer: PreTrainedTokenizerBase | None = None) -> Policy:
    """The model, tokenizer, image processor and layout spec of a model directory (eval mode).

    ``tokenizer``: the one this directory was written with, already in memory (reading the
    real Qwen2 tokenizer back takes seconds; the tiny ``tiny-<family>`` server skips that).
    """
    from transformers import AutoModelForImageTextToText

    checked = inspect_model_dir(path, min_pixels, max_pixels)
    try:
        tokenizer = _load_tokenizer(checked.path) if tokenizer is None else tokenizer
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{checked.path}: the tokenizer does not load: {_first_line(exc)}") from None
    _check_token_ids(checked.path, checked.family, tokenizer)
    with torch.random.fork_rng(devices=[]):  # loading must not move the global RNG that sampling draws from
        model = AutoModelForImageTextToText.from_pretrained(str(checked.path), dtype=dtype).eval()
    return Policy(checked.path, checked.family, model, tokenizer, checked.processor, checked.spec)


def spec_of(family: str, processor: Any, where: Path | str) -> LayoutSpec:
    """The layout spec of a processor; ``ProcessorConfigError`` unless the spec rebuilds the same processor."""
    spec = spec_from_image_processor(family, processor)
    ours, rebuilt = processor.to_dict(), build_image_processor(spec).to_dict()
    differing = [f"{key} {_plain(ours.get(key))} (processor config) != {_plain(rebuilt.get(key))} (layout math)"
                 for key in PIXEL_KEYS if _plain(ours.get(key)) != _plain(rebuilt.get(key))]
    if differing:
        raise ProcessorConfigError(f"{where}: the image processor config cannot be reproduced by the {family} layout "
                                   f"math: {'; '.join(differing)}")
    return spec


def _image_processor(path: Path, family: str, config: dict[str, Any], min_pixels: int | None,
                     max_pixels: int | None) -> Any:
    """The directory's image processor (PIL backend), with the pixel overrides, checked against the model."""
    file = _require(path, PROCESSOR_FILES, "an image processor config (save it with processor.save_pretrained(DIR))")
    raw = _read_json(file)
    raw = raw.get("image_processor", raw)  # processor_config.json nests it
    kind = raw.get("image_processor_type")
    spec = layout_spec(family)
    if kind not in PROCESSOR_TYPES[spec.resize]:
        kinds = {"smart": "Qwen-VL", "navit": "Kimi K2.5"}
        raise ProcessorConfigError(f"{file}: image_processor_type {kind!r} is not a {kinds[spec.resize]} image "
                                   f"processor; the layout math reproduces {sorted(PROCESSOR_TYPES[spec.resize])}")
    overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if overrides and spec.resize != "smart":
        raise ProcessorConfigError(f"{file}: {family} resizes by patch limits (navit), it has no min/max pixels; "
                                   f"set max_patches or size in the processor config instead of {sorted(overrides)}")
    processor = image_processor_class(spec).from_dict(raw, **overrides)
    vision = config.get("vision_config") or {}
    for ours, theirs in VISION_KEYS.items():
        if theirs in vision and int(vision[theirs]) != int(getattr(processor, ours)):
            raise ProcessorConfigError(f"{file}: {ours} {getattr(processor, ours)} but config.json vision_config "
                                       f"{theirs} is {vision[theirs]}: the grids would not fit the vision tower")
    return processor


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The directory's tokenizer as saved. One saved as the generic fast backend (``TokenizersBackend``, what
    mmref writes) loads as that: ``AutoTokenizer`` would build the model type's class instead (Qwen3.5's
    re-derives its special tokens, making ``<|endoftext|>`` the unknown token)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = path / "tokenizer_config.json"
    saved_as = _read_json(config).get("tokenizer_class") if config.is_file() else None
    loader = PreTrainedTokenizerFast if saved_as in ("TokenizersBackend", "PreTrainedTokenizerFast") else AutoTokenizer
    return loader.from_pretrained(str(path))


def _check_token_ids(path: Path, family: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer's vision special tokens must be the ids config.json gives the model."""
    config = _read_json(path / "config.json")
    for name, token_id in vision_token_ids(tokenizer, family).items():
        if name in config and config[name] != token_id:
            raise ModelDirError(f"{path}: the tokenizer has {vision_tokens(family)[name]} at id {token_id} but "
                                f"config.json {name} is {config[name]}: the tokenizer is not this model's")


def _check_weights(path: Path) -> None:
    for index in WEIGHT_INDEXES:
        if (path / index).exists():
            shards = sorted(set(_read_json(path / index).get("weight_map", {}).values()))
            missing = [shard for shard in shards if not (path / shard).exists()]
            if missing:
                raise IncompleteModelDirError(f"{path}: {index} lists {len(missing)} weight shard(s) that are missing: "
                                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
            return
    _require(path, WEIGHT_FILES, "weights (model.safetensors, or model.safetensors.index.json with its shards)")


def _require(path: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` present in ``path``; ``IncompleteModelDirError`` naming ``what`` is missing."""
    for name in names:
        if (path / name).is_file():
            return path / name
    raise IncompleteModelDirError(f"{path} is not a loadable model directory: no {' or '.join(names)} ({what})")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{file} cannot be read as JSON: {_first_line(exc)}") from None


def _plain(value: Any) -> Any:
    """A processor value as its JSON holds it (tuples as lists, enums as their values), for comparing and naming."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 12)  # mean/std: the same numbers through float32 and JSON
    return value.value if isinstance(value, enum.Enum) else value


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
