"""Run the vision tower once per unique image of a row, then give every slot its features.

In GRPO a group of 8 samples shows the same images 8 times. The materializer keeps one
copy of each unique image's pixels (``MaterializedRow.pixel_values``) plus ``image_index``
(slot -> unique image); this hook makes the model's own forward consume that::

    with vision_once(model.model.visual, unique_grid_thw, image_index, merge_size):
        logits = model(input_ids=..., pixel_values=unique_pixels, image_grid_thw=slot_grids, ...)

A forward pre-hook hands the tower the unique grids; a forward hook expands its merged
output (and Qwen3-VL's deepstack features) to the slots with ``index_select``, whose
backward sums each slot's gradient into its image. Images never attend to each other in
the tower (``cu_seqlens`` per image), so the result equals running it on every slot.
The model is still called through its root ``forward``, so FSDP2 unsharding is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def slot_feature_index(unique_grid_thw: torch.Tensor, image_index: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Row indices into the towers' merged output (unique images) that lay out every slot in order."""
    tokens = unique_grid_thw.prod(dim=-1) // merge_size**2
    starts = torch.cumsum(tokens, 0) - tokens
    return torch.cat([torch.arange(int(starts[i]), int(starts[i] + tokens[i])) for i in image_index.tolist()])


@contextmanager
def vision_once(visual: torch.nn.Module, unique_grid_thw: torch.Tensor, image_index: torch.Tensor,
                merge_size: int) -> Iterator[None]:
    """Within the block, ``visual`` runs on the unique images and returns features for every slot."""
    gather = slot_feature_index(unique_grid_thw, image_index, merge_size)

    def before(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "grid_thw": unique_grid_thw.to(args[0].device)}

    def after(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        index = gather.to(output.pooler_output.device)
        output.pooler_output = output.pooler_output.index_select(0, index)
        if getattr(output, "deepstack_features", None):
            output.deepstack_features = [f.index_select(0, index) for f in output.deepstack_features]
        return output

    handles = [visual.register_forward_pre_hook(before, with_kwargs=True),
               visual.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
