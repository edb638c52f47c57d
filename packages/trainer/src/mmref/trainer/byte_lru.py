"""An LRU map bounded by the bytes of its values (processed image features)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


class ByteLRU(Generic[V]):
    """Keeps the most recently used values whose ``nbytes`` sum stays within ``budget``.

    A value larger than the whole budget is never kept (budget 0 disables caching).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> None:
        if value.nbytes > self.budget or key in self._entries:
            return
        self._entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.evictions += 1
