"""What moving blocks between a node's tiers did: the typed results of ``demote`` and ``promote``.

The node's mover (:mod:`kvpool.node.mover`) makes them; the master reads them through the
``NodeHandle`` interface, from the node in its own process or from a ``RemoteNode`` that
rebuilt them from node.proto. Both return these same types, so the master's tiering code
never needs to know which kind of node it asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpool.errors import PoolFull
from kvpool.tiers.base import Slot

__all__ = ["DemoteResult", "PromoteResult"]


@dataclass
class DemoteResult:
    """What one demote or write-through batch did.

    ``moved``: (key, nvme_slot) of every block now durable on NVMe and in the catalog, in
    batch order, including blocks that were already there with the same checksum (no I/O;
    not counted in ``bytes_moved``, which is what this batch wrote). ``no_space``: keys that
    did not move because NVMe had no room (no free slot or ENOSPC); retry them after
    evicting. ``failed``: (key, reason) for other I/O errors (and "cancelled").
    ``keep_dram``: True for a write-through (the DRAM copies stay), False for a demotion
    (the caller frees the DRAM slots of ``moved``).
    """

    moved: list[tuple[bytes, Slot]] = field(default_factory=list)
    no_space: list[bytes] = field(default_factory=list)
    failed: list[tuple[bytes, str]] = field(default_factory=list)
    keep_dram: bool = False
    bytes_moved: int = 0
    seconds: float = 0.0

    @property
    def full(self) -> bool:
        return bool(self.no_space)

    def pool_full(self) -> PoolFull | None:
        """A :class:`PoolFull` error describing ``no_space``, or None when all fit."""
        if not self.no_space:
            return None
        return PoolFull(f"the NVMe tier has no room for {len(self.no_space)} block(s); "
                        f"evict from NVMe or enlarge --nvme")


@dataclass
class PromoteResult:
    """What one promote batch did.

    ``promoted``: keys whose bytes are in their DRAM slots and passed the checksum: only
    these may be served. ``corrupt``: (key, reason) for blocks that failed the checksum or
    could not be read; they are gone from the catalog and their NVMe slots are freed.
    ``kept_nvme``: whether the NVMe copies of ``promoted`` stay (otherwise they were dropped).
    """

    promoted: list[bytes] = field(default_factory=list)
    corrupt: list[tuple[bytes, str]] = field(default_factory=list)
    kept_nvme: bool = True
    bytes_moved: int = 0
    seconds: float = 0.0
