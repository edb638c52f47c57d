"""The model on one materialized packed row, with the checks that run before the vision tower.

Checks, before any compute, on the row's actual ``input_ids``:
- a row of several samples is one its family can pack exactly (``pack.check_row_packing``);
- the slots are exactly the image-pad runs (``mmref.renderers.refs.check_slots``: a stray,
  missing or shifted pad is a ``SlotError`` naming the row and the asset);
- image-pad tokens == features the grids will produce (``t*h*w / merge**2`` summed), else
  ``ImageTokenMismatchError`` naming the token id, both counts and the assets;
- no image special token among the sampled (loss) tokens: the engine never samples them,
  so one there means a corrupted trace. ``sampled_image_tokens="error"`` raises,
  ``"mask"`` drops those tokens from the loss and counts them.

Logprobs use the engine's image-special-token mask and each sample's sampling temperature
(``mmref.trainer.logprobs``), so trainer and inference logprobs are comparable token for
token; entropy is of the same tempered distribution.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from mmref.renderers.refs import check_slots
from mmref.trainer.errors import ImageTokenMismatchError
from mmref.trainer.logprobs import logprob_scale, masked_log_softmax
from mmref.trainer.materialize import MaterializedRow
from mmref.trainer.pack import RopeIndex, check_row_packing, row_position_ids
from mmref.trainer.vision_once import vision_once


@dataclass(frozen=True)
class RowOutput:
    """Per-token results for positions 1..L-1 of a row (what predicts token t is logits[t-1]),
    and for the row's branches (``PackedRow.branch_*``).

    logprobs: (L-1,) of the actual next tokens;  entropy: (L-1,);  loss_mask: (L-1,) bool
    branch_logprobs, branch_entropy, branch_mask: (B,)
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    loss_mask: torch.Tensor
    masked_sampled_image_tokens: int
    branch_logprobs: torch.Tensor
    branch_entropy: torch.Tensor
    branch_mask: torch.Tensor


def check_image_tokens(batch: MaterializedRow, merge_size: int, where: str = "row") -> None:
    """Raise unless the row's ``input_ids`` hold its slots' pads exactly and they match the grids' features."""
    row = batch.row
    ids = batch.input_ids[0].tolist()
    check_slots(ids, row.images, row.image_pad_id, where=f"trainer forward, {where}")
    pads = ids.count(row.image_pad_id)
    grids = batch.image_grid_thw
    features = int((grids.prod(dim=1) // merge_size**2).sum()) if grids is not None else 0
    if pads != features:
        assets = ", ".join(s.ref.asset for s in row.images) or "none"
        raise ImageTokenMismatchError(
            f"trainer forward, {where}: {pads} image-pad tokens (id {row.image_pad_id}) but the image grids "
            f"produce {features} features; assets: {assets}"
        )


def position_scales(row_lengths: list[int], temperatures: list[float]) -> torch.Tensor:
    """(L,) the logit divisor at each position of a packed row: its sample's ``logprob_scale``."""
    scales = torch.tensor([logprob_scale(t) for t in temperatures], dtype=torch.float32)
    return torch.repeat_interleave(scales, torch.tensor(row_lengths))


def sampled_image_token_mask(input_ids: torch.Tensor, loss_mask: torch.Tensor, image_token_ids: Iterable[int]) -> torch.Tensor:
    """(L,) True where a loss token is an image special token."""
    banned = torch.tensor(sorted(image_token_ids), dtype=input_ids.dtype)
    return loss_mask & torch.isin(input_ids[0], banned)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower of a ``*ForConditionalGeneration`` model: Qwen-VL's ``.model.visual`` (merger
    included) or Kimi K2.5's ``.model.vision_tower`` (its projector is ``.model.mm_projector``)."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "module", inner)  # unwrap DDP
    tower = getattr(inner, "visual", None) or getattr(inner, "vision_tower", None)
    if tower is None:
        raise TypeError(f"{type(model).__name__} has no .model.visual or .model.vision_tower: "
                        "not a Qwen-VL or Kimi model")
    return tower


def rope_index_of(model: torch.nn.Module) -> RopeIndex | None:
    """The model's mRoPE ``get_rope_index`` (Qwen-VL keeps it on the inner ``.model``); None for a model
    whose text positions are plain 1-D ones (Kimi K2.5's DeepSeek-V3)."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "module", inner)  # unwrap DDP
    return getattr(inner, "get_rope_index", None)


def forward_row(model: torch.nn.Module, batch: MaterializedRow, rope_index: RopeIndex | None,
                image_token_ids: Iterable[int], merge_size: int,
                sampled_image_tokens: Literal["error", "mask"] = "error", positions: Literal["loss", "all"] = "loss",
                where: str = "row") -> RowOutput:
    """Run the model on a packed row; per-token logprobs and entropy at each sample's temperature.

    ``positions="loss"`` computes them only where the loss needs them (0 elsewhere): the full
    (L, vocab) float32 softmax of a 4k-token row over Qwen's 152k vocab is 2.5 GB per copy.
    """
    image_token_ids = frozenset(image_token_ids)
    check_row_packing(batch.row, f"trainer forward, {where}")
    check_image_tokens(batch, merge_size, where)
    row = batch.row
    loss_mask, branch_mask = batch.loss_mask.clone(), batch.branch_mask.clone()
    branch_tokens = torch.tensor(row.branch_token_ids, dtype=torch.long)  # (B,)
    bad = sampled_image_token_mask(batch.input_ids, loss_mask, image_token_ids)
    bad_branches = branch_mask & torch.isin(branch_tokens, torch.tensor(sorted(image_token_ids), dtype=torch.long))
    if bad.any() or bad_branches.any():
        if sampled_image_tokens == "error":
            found = (bad.nonzero().flatten().tolist() + [row.branch_positions[i] for i in bad_branches.nonzero().flatten().tolist()])
            raise ImageTokenMismatchError(f"trainer forward, {where}: image special tokens inside sampled completions at "
                                          f"positions {sorted(found)[:8]}; the inference engine must mask them")
        loss_mask &= ~bad
        branch_mask &= ~bad_branches
    device = next(model.parameters()).device
    position_ids = row_position_ids(rope_index, row).to(device)  # (4, 1, L), or (1, L) without mRoPE
    targets = batch.input_ids[0, 1:].to(device)
    keep = loss_mask[1:].to(device) if positions == "loss" else torch.ones_like(targets, dtype=torch.bool)
    main = keep.nonzero().flatten()  # positions whose next token we score
    branch_at = torch.tensor(row.branch_positions, dtype=torch.long, device=device) - 1  # (B,) likewise, for branches
    index = torch.unique(torch.cat([main, branch_at]))  # sorted: the rows of logits to compute
    kwargs, images = {}, nullcontext()
    if batch.unique_pixels:
        kwargs = dict(pixel_values=batch.pixel_values().to(device), image_grid_thw=batch.image_grid_thw.to(device))
        images = vision_once(vision_tower(model), batch.unique_grid_thw, batch.image_index, merge_size)
    # logits_to_keep: the LM head (and its backward) runs only where a logprob is needed.
    with images:
        logits = model(input_ids=batch.input_ids.to(device), position_ids=position_ids, logits_to_keep=index,
                       mm_token_type_ids=batch.mm_token_type_ids.to(device), use_cache=False, **kwargs).logits[0]
    scales = position_scales(row.sample_lengths, row.sample_temperatures)[:-1].to(device)  # (L-1,)
    logp = masked_log_softmax(logits / scales[index, None], image_token_ids)  # (K, V)
    probs = logp.exp()
    entropies = -(probs * torch.where(probs > 0, logp, torch.zeros_like(logp))).sum(-1)  # (K,)
    at_main, at_branch = torch.searchsorted(index, main), torch.searchsorted(index, branch_at)
    token_logp = torch.zeros(targets.shape, dtype=logp.dtype, device=device)
    token_logp = token_logp.index_put((main,), logp[at_main].gather(-1, targets[main, None]).squeeze(-1))
    entropy = torch.zeros_like(token_logp).index_put((main,), entropies[at_main])
    branch_logp = logp[at_branch].gather(-1, branch_tokens.to(device)[:, None]).squeeze(-1)
    return RowOutput(token_logp, entropy, loss_mask[1:].to(device), int(bad.sum() + bad_branches.sum()),
                     branch_logp, entropies[at_branch], branch_mask.to(device))
