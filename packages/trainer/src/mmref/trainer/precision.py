"""How a model trains: its dtype, gradient checkpointing, a frozen vision tower, and its sharding units.

    model = prepare_model(policy.model, TrainConfig(dtype="bfloat16", freeze_vision=True), "cpu")

``train.dtype = "auto"`` is bfloat16 on CUDA and float32 on CPU. In one process the weights
are cast to that dtype; under FSDP2 (``distributed.wrap_data_parallel``) they stay float32
shards and ``MixedPrecisionPolicy`` casts each unit's gathered weights for compute, with
gradients reduced in float32. ``shard_units`` are the modules ``fully_shard`` wraps one by
one before the root: the model's ``_no_split_modules`` (Qwen-VL: each decoder layer and each
vision block), found by class name so every Qwen-VL family works without a table.
"""

from __future__ import annotations

from typing import Literal

import torch

from mmref.trainer.forward import vision_tower
from mmref.trainer.run_config import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

DTypeName = Literal["auto", "float32", "bfloat16"]


def resolve_dtype(name: DTypeName, device: str | torch.device) -> torch.dtype:
    """The torch dtype of ``train.dtype`` on ``device``: "auto" is bfloat16 on CUDA, float32 elsewhere.

        >>> resolve_dtype("auto", "cpu")
        torch.float32
    """
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"train.dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def vision_modules(model: torch.nn.Module) -> torch.nn.Module:
    """The vision side of a ``*ForConditionalGeneration`` model: Qwen-VL's tower (merger included), or
    Kimi K2.5's tower with its projector (``mm_projector``, Kimi's merger) in one ``ModuleList``."""
    tower = vision_tower(model)
    projector = getattr(getattr(model, "model", None), "mm_projector", None)
    return tower if projector is None else torch.nn.ModuleList([tower, projector])


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules to shard one by one before the root: those whose class is in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if module is not model and type(module).__name__ in names]


def prepare_model(model: torch.nn.Module, config: TrainConfig, device: str | torch.device, sharded: bool = False) -> torch.nn.Module:
    """Apply ``config``'s freeze_vision, gradient_checkpointing and dtype to ``model``, in place.

    ``sharded``: FSDP2 will cast for compute (``wrap_data_parallel(param_dtype=...)``), so the
    weights stay float32 here.
    """
    if config.freeze_vision:
        vision_modules(model).requires_grad_(False)
    if config.gradient_checkpointing:
        # Non-reentrant: recomputes under FSDP2 hooks and with inputs that need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype = torch.float32 if sharded else resolve_dtype(config.dtype, device)
    return model.to(device=device, dtype=dtype)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: those that require a gradient."""
    return [p for p in model.parameters() if p.requires_grad]
