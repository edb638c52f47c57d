"""What ``mmref serve`` serves: a model, its live image processor and layout spec, an engine.

``tiny-<family>`` builds a tiny random model of that family (the embedded default); any
other value is a checkpoint directory (``mmref.trainer.checkpoint`` or ``save_pretrained``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmref.renderers.layout import LayoutSpec, layout_spec
from mmref.trainer.inference.engine import Engine, TransformersEngine
from mmref.trainer.models import (
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
                      max_model_len: int | None = None) -> ServedModel:
    """Build the model, its processor and an engine from ``tiny-<family>`` or a checkpoint directory.

    ``max_model_len`` caps prompt + completion below the model's position limit (as vLLM's
    option of that name does): it bounds the work a single request can ask for.
    """
    meta: dict[str, Any] = {}
    if model.startswith("tiny-"):
        hf_model = build_tiny_model(model.removeprefix("tiny-"))
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
    if engine != "transformers":
        raise ValueError(f"engine {engine!r} is not available in this build: the vLLM request translation exists "
                         "(mmref.trainer.inference.vllm_engine) but is not wired to a server engine yet")
    served_engine: Engine = TransformersEngine(hf_model, image_token_ids_of(hf_model), stops,
                                           pad_token_id=meta.get("pad_token_id", stops[0]), device=device,
                                           weight_version=int(meta.get("weight_version", 0)),
                                           max_model_len=max_model_len)
    return ServedModel(model, family, processor_spec(family, processor), processor, served_engine,
                       int(hf_model.config.image_token_id))
