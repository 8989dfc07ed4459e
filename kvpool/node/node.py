"""A storage node: owns the tier arenas and tells clients how to reach them.

The node holds memory; the master holds metadata. The master reserves and frees slots
through the :class:`kvpool.master.nodes.NodeHandle` interface, which :class:`Node`
implements, and clients copy bytes straight into the arenas over the data plane.

Invariant: ``close()`` unlinks every shared-memory segment the node created, so a clean
shutdown leaves nothing in /dev/shm.
"""

from __future__ import annotations

import logging

from kvpool.tiers.base import Arena, Slot, TierCaps, TierUsage
from kvpool.tiers.dram import DramArena
from kvpool.transport.shm import host_id

__all__ = ["Node"]

log = logging.getLogger("kvpool.node")


class Node:
    def __init__(self, node_id: int, name: str, tiers: list[Arena]) -> None:
        if not tiers:
            raise ValueError("a node needs at least one tier")
        self.node_id = node_id
        self.name = name
        self.tiers: dict[str, Arena] = {t.name: t for t in tiers}

    @classmethod
    def with_dram(cls, node_id: int, name: str, dram_bytes: int, *, chunk_bytes: int = 64 << 20,
                  prefault: bool = True) -> "Node":
        return cls(node_id, name, [DramArena(dram_bytes, chunk_bytes=chunk_bytes, prefault=prefault)])

    # NodeHandle ---------------------------------------------------------------

    def tier_names(self) -> list[str]:
        return list(self.tiers)

    def allocate(self, tier: str, size: int) -> Slot | None:
        return self.tiers[tier].allocate(size)

    def free(self, tier: str, slot: Slot) -> None:
        self.tiers[tier].free(slot)

    def free_slots_for(self, tier: str, size: int) -> int:
        return self.tiers[tier].slots.free_slots_for(size)

    def usage(self) -> list[TierUsage]:
        return [t.usage() for t in self.tiers.values()]

    def endpoint(self) -> dict:
        transports: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for arena in self.tiers.values():
            if TierCaps.HOST_SHARED in arena.caps:
                desc = arena.describe()
                transports[f"shm.{arena.name}"] = desc["shm_name"]
                sizes[f"shm.{arena.name}"] = arena.capacity
        return {"node_id": self.node_id, "name": self.name, "host_id": host_id(),
                "transports": transports, "segment_bytes": sizes}

    def max_block_bytes(self, tier: str) -> int:
        return self.tiers[tier].slots.max_block_bytes

    def close(self) -> None:
        for arena in self.tiers.values():
            arena.close()
