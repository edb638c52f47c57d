"""The order a dataset's rows are played in: seeded shuffles per epoch, and a position to resume from.

    order = DataOrder(size=5, seed=0)
    first = [order.next() for _ in range(7)]      # epoch 0's permutation, then epoch 1's begins
    state = order.state_dict()                    # {"epoch": 1, "index": 2}
    again = DataOrder(size=5, seed=0); again.load_state_dict(state)
    again.next() == order.next()                  # True: a resumed run continues the order
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mmref.client.errors import DatasetError


class DatasetExhaustedError(DatasetError):
    """Every epoch of the split has been played."""


@dataclass
class DataOrder:
    """Row indices, epoch after epoch; each epoch a permutation drawn from ``(seed, epoch)`` when shuffled."""

    size: int
    seed: int = 0
    shuffle: bool = True
    epochs: int | None = None  # None: endless
    epoch: int = 0
    index: int = 0
    _permutation: tuple[int, list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise DatasetError("the split has no rows to play")

    def next(self) -> int:
        """The next row index (raises ``DatasetExhaustedError`` after the last epoch)."""
        if self.index >= self.size:
            self.epoch, self.index = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise DatasetExhaustedError(f"all {self.epochs} epoch(s) of {self.size} rows were played; raise "
                                        "env.args.epochs (or leave it unset for endless epochs) or lower max_steps")
        row = self._order()[self.index]
        self.index += 1
        return row

    def state_dict(self) -> dict[str, int]:
        """The position: the epoch and how many of its rows were handed out."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.size:
            raise DatasetError(f"data position {state} does not fit a split of {self.size} rows")
        self.epoch, self.index = epoch, index

    def _order(self) -> list[int]:
        if self._permutation is None or self._permutation[0] != self.epoch:
            rows = list(range(self.size))
            if self.shuffle:  # str seeds hash with sha512: the same permutation in every process and Python build
                random.Random(f"mmref-data:{self.seed}:{self.epoch}").shuffle(rows)
            self._permutation = (self.epoch, rows)
        return self._permutation[1]
