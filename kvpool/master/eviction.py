"""Eviction policies: which committed, unpinned blocks leave a tier first.

Protocol between the master's index and a policy:

* ``insert(key, info)`` when a block is committed (becomes resident in the tier);
* ``access(key)`` on every hit (Lookup, Get) of a resident block;
* ``remove(key)`` when a block leaves, whoever chose it (eviction, Remove, Flush);
* ``select_victims(count, evictable)`` returns up to ``count`` resident keys, best victim
  first, for which ``evictable(key)`` is true. It does not remove them: the index evicts
  what it takes and calls ``remove`` for each.

A policy only orders keys. It never frees memory and never sees leases or grants: the
``evictable`` predicate is how the index keeps leased and uncommitted blocks out of reach.
The replay tool (``kvpool replay``) drives these same classes through the same calls,
so what it measures is what the master runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, ClassVar

__all__ = ["BlockInfo", "EvictionPolicy", "LRUPolicy", "POLICIES", "make_policy", "DEFAULT_POLICY"]


@dataclass(frozen=True)
class BlockInfo:
    """What a policy may know about a block when it is inserted."""

    size: int
    #: Index of the block in its prefix chain (0 = first block of a prompt); -1 if unknown.
    position: int = -1
    namespace: str = ""


class EvictionPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def insert(self, key: bytes, info: BlockInfo) -> None: ...

    @abstractmethod
    def access(self, key: bytes) -> None: ...

    @abstractmethod
    def remove(self, key: bytes) -> None: ...

    @abstractmethod
    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]: ...

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first. O(1) insert, access and remove."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, info: BlockInfo) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        out: list[bytes] = []
        for key in self._order:
            if len(out) >= count:
                break
            if evictable(key):
                out.append(key)
        return out

    def __len__(self) -> int:
        return len(self._order)


#: Policies by name, for ``--eviction-policy`` and ``kvpool replay --policy``.
POLICIES: dict[str, type[EvictionPolicy]] = {LRUPolicy.name: LRUPolicy}
DEFAULT_POLICY = "lru"


def make_policy(name: str | None = None) -> EvictionPolicy:
    name = name or DEFAULT_POLICY
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
