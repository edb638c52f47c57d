"""Packing samples into rows of ``max_seq_len`` tokens, and the position ids of a packed row.

First-fit-decreasing over sample lengths, one family per row; image slots are rebased
into the row and an image is never split. Samples that differ only in their last token,
which each sampled (a GRPO group with one-token answers), share one sequence: the first
keeps its tokens in the row, the others become *branches*, extra sampled tokens scored at
the same positions (``share_prefixes``). Exact: every sample's tokens get the loss they
would get alone, and the group's prompt is forwarded once instead of G times. A packed row carries refs only; its position ids
are the model's own ``get_rope_index`` per sample, stacked as 4 rows (a model without
mRoPE, Kimi K2.5, gets the first row alone)::

    position_ids[0]    text positions, restarting at 0 per sample (transformers builds a
                       block-diagonal causal mask from these resets)
    position_ids[1:4]  mRoPE (t, h, w) positions per sample

so a packed row's logits equal each sample's logits when run alone. That holds for
attention only: a family whose text model carries state along the sequence (Qwen3.5's
gated delta net layers; transformers' torch path ignores the position resets) gets one
sample per row (``SEQUENTIAL_FAMILIES``), and a row holding several is a ``PackingError``.
Branches stay exact for every family: they share their sample's one sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mmref.renderers.refs import ImageSlot, token_types
from mmref.trainer.errors import PackingError
from mmref.trainer.samples import TrainingSample


# family -> why several samples in one row would not each get the logits they get alone.
SEQUENTIAL_FAMILIES = {
    "qwen3.5": "its linear-attention (gated delta net) layers carry conv and recurrent state across sample "
               "boundaries; position-id resets only separate the attention layers",
}


def packs_samples(family: str) -> bool:
    """Whether samples of ``family`` may share a row (each still gets the logits it gets alone)."""
    return family not in SEQUENTIAL_FAMILIES


def check_row_packing(row: PackedRow, where: str = "row") -> None:
    """``PackingError`` for a row of several samples of a family that cannot pack them exactly."""
    if len(row.sample_lengths) > 1 and not packs_samples(row.family):
        raise PackingError(f"{where}: {len(row.sample_lengths)} samples of family {row.family!r} in one row, but "
                           f"{SEQUENTIAL_FAMILIES[row.family]}; pack them one per row (mmref.trainer.pack.pack)")


@dataclass(frozen=True)
class PackedRow:
    """Samples laid end to end; ``sample_lengths`` marks the boundaries.

    ``sample_temperatures`` holds each sample's sampling temperature: its tokens are scored
    under ``logits / T`` as the engine reported them. ``branch_*`` (parallel lists) are
    sampled tokens scored besides the row's own: ``branch_token_ids[i]`` at row position
    ``branch_positions[i]`` (predicted from the logits before it), with its advantage and
    inference logprob.
    """

    family: str
    token_ids: list[int]
    loss_mask: list[bool]
    advantages: list[float]
    inference_logprobs: list[float]
    images: list[ImageSlot]
    sample_lengths: list[int]
    image_pad_id: int
    sample_temperatures: list[float]
    branch_positions: list[int] = field(default_factory=list)
    branch_token_ids: list[int] = field(default_factory=list)
    branch_advantages: list[float] = field(default_factory=list)
    branch_logprobs: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def mm_token_type_ids(self) -> list[int]:
        return token_types(len(self.token_ids), self.images)

    def to_wire(self) -> dict:
        """Plain lists and ref strings (msgpack/JSON-ready); no pixels."""
        return {"family": self.family, "token_ids": self.token_ids, "loss_mask": self.loss_mask,
                "advantages": self.advantages, "inference_logprobs": self.inference_logprobs,
                "images": [s.model_dump(mode="json") for s in self.images],
                "sample_lengths": self.sample_lengths, "image_pad_id": self.image_pad_id,
                "sample_temperatures": self.sample_temperatures, "branch_positions": self.branch_positions,
                "branch_token_ids": self.branch_token_ids, "branch_advantages": self.branch_advantages,
                "branch_logprobs": self.branch_logprobs}

    @classmethod
    def from_wire(cls, data: dict) -> PackedRow:
        return cls(**{**data, "images": [ImageSlot.model_validate(s) for s in data["images"]]})


@dataclass(frozen=True)
class MicroBatch:
    """The unit a trainer rank receives: a few packed rows for one optimizer step."""

    step: int
    rows: list[PackedRow]

    @property
    def num_loss_tokens(self) -> int:
        return sum(sum(r.loss_mask) + len(r.branch_positions) for r in self.rows)

    def to_wire(self) -> dict:
        return {"step": self.step, "rows": [r.to_wire() for r in self.rows]}

    @classmethod
    def from_wire(cls, data: dict) -> MicroBatch:
        return cls(step=data["step"], rows=[PackedRow.from_wire(r) for r in data["rows"]])


def truncate(sample: TrainingSample, max_len: int) -> TrainingSample:
    """Cut a sample to at most ``max_len`` tokens, never inside an image (start token included)."""
    if len(sample) <= max_len:
        return sample
    cut = max_len
    for slot in sample.images:
        if slot.offset - 1 < cut < slot.end + 1:  # would split <|vision_start|> pads <|vision_end|>
            cut = slot.offset - 1
            break
    kept = [s for s in sample.images if s.end < cut]
    if sample.images and not kept and cut < sample.images[0].end + 1:
        first = sample.images[0]
        raise PackingError(f"sample of {len(sample)} tokens: its first image ({first.ref.describe()}) ends at "
                           f"{first.end + 1} > max_seq_len {max_len}; raise max_seq_len or shrink the image")
    return TrainingSample(
        family=sample.family, token_ids=sample.token_ids[:cut], loss_mask=sample.loss_mask[:cut],
        advantages=sample.advantages[:cut], inference_logprobs=sample.inference_logprobs[:cut], images=kept,
        image_pad_id=sample.image_pad_id, weight_version=sample.weight_version, temperature=sample.temperature,
        meta=sample.meta,
    )


Branch = tuple[int, int, float, float]  # (position in the sample, token id, advantage, inference logprob)


def share_prefixes(samples: Sequence[TrainingSample]) -> list[tuple[TrainingSample, list[Branch]]]:
    """Samples with equal tokens, masks, images and temperature up to a sampled last token, as one
    sample plus the others' sampled tokens as branches; other samples stand alone (no branches).

    >>> [len(branches) for _, branches in share_prefixes([])]
    []
    """
    shared: dict[tuple, tuple[TrainingSample, list[Branch]]] = {}
    units: list[tuple[TrainingSample, list[Branch]]] = []
    for sample in samples:
        if not sample.loss_mask or not sample.loss_mask[-1]:
            units.append((sample, []))
            continue
        key = (sample.family, sample.image_pad_id, sample.temperature, tuple(sample.token_ids[:-1]),
               tuple(sample.loss_mask), tuple((slot.offset, slot.ref.sha256) for slot in sample.images))
        if key in shared:
            shared[key][1].extend((p, sample.token_ids[p], sample.advantages[p], sample.inference_logprobs[p])
                                  for p, sampled in enumerate(sample.loss_mask) if sampled)
        else:
            shared[key] = (sample, [])
            units.append(shared[key])
    return units


def pack(samples: Sequence[TrainingSample], max_seq_len: int, share: bool = True) -> list[PackedRow]:
    """First-fit-decreasing into rows of at most ``max_seq_len`` tokens; families never mix.

    ``share``: samples that differ only in their sampled last token share one sequence.
    A family that cannot pack samples (``SEQUENTIAL_FAMILIES``) gets one sample per row.
    """
    truncated = [truncate(s, max_seq_len) for s in samples]
    units = share_prefixes(truncated) if share else [(s, []) for s in truncated]
    bins: list[list[tuple[TrainingSample, list[Branch]]]] = []
    sizes: list[int] = []
    for unit in sorted(units, key=lambda u: len(u[0]), reverse=True):
        sample = unit[0]
        for i, members in enumerate(bins):
            if (members[0][0].family == sample.family and packs_samples(sample.family)
                    and sizes[i] + len(sample) <= max_seq_len):
                members.append(unit)
                sizes[i] += len(sample)
                break
        else:
            bins.append([unit])
            sizes.append(len(sample))
    return [_concat(members) for members in bins]


def _concat(members: list[tuple[TrainingSample, list[Branch]]]) -> PackedRow:
    first = members[0][0]
    row = PackedRow(first.family, [], [], [], [], [], [], first.image_pad_id, [])
    for sample, branches in members:
        offset = len(row.token_ids)
        row.token_ids.extend(sample.token_ids)
        row.loss_mask.extend(sample.loss_mask)
        row.advantages.extend(sample.advantages)
        row.inference_logprobs.extend(sample.inference_logprobs)
        row.images.extend(slot.shifted(offset) for slot in sample.images)
        row.sample_lengths.append(len(sample))
        row.sample_temperatures.append(sample.temperature)
        for position, token, advantage, logprob in branches:
            row.branch_positions.append(position + offset)
            row.branch_token_ids.append(token)
            row.branch_advantages.append(advantage)
            row.branch_logprobs.append(logprob)
    return row


def split_by_tokens(rows: Sequence[PackedRow], parts: int) -> list[list[PackedRow]]:
    """``rows`` in ``parts`` groups of near-equal token count (longest row to the lightest group).

    >>> [len(g) for g in split_by_tokens([], 2)]
    [0, 0]
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    groups: list[list[PackedRow]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for row in sorted(rows, key=len, reverse=True):
        lightest = loads.index(min(loads))
        groups[lightest].append(row)
        loads[lightest] += len(row)
    return groups


def occupancy(rows: Sequence[PackedRow], max_seq_len: int) -> float:
    """Fraction of row capacity holding tokens."""
    return sum(len(r) for r in rows) / (len(rows) * max_seq_len) if rows else 0.0


RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def row_position_ids(rope_index: RopeIndex | None, row: PackedRow) -> torch.Tensor:
    """(4, 1, L) position ids of a packed row from the model's ``get_rope_index``, per sample; (1, L) text
    positions alone for a model without mRoPE (``rope_index=None``: Kimi K2.5)."""
    if rope_index is None:
        return torch.cat([torch.arange(length) for length in row.sample_lengths]).view(1, -1)
    ids = torch.tensor(row.token_ids)
    types = torch.tensor(row.mm_token_type_ids)
    pieces, start = [], 0
    for length in row.sample_lengths:
        end = start + length
        grids = [s.ref.grid_thw for s in row.images if start <= s.offset < end]
        mrope, _ = rope_index(ids[None, start:end], mm_token_type_ids=types[None, start:end],
                              image_grid_thw=torch.tensor(grids) if grids else None)
        text = torch.arange(length).view(1, 1, -1)
        pieces.append(torch.cat([text, mrope.to(text.dtype)], dim=0))  # (4, 1, length)
        start = end
    return torch.cat(pieces, dim=2)
