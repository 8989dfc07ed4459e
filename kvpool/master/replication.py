"""Replicas: each committed block of a namespace kept on ``replicas`` nodes of different hosts.

How many copies a block gets is its namespace's setting (``RegisterNamespace.replicas``,
``kvpool admin namespaces --set-replicas``), or the pool default (``kvpool master
--replicas``) for a namespace without one (:meth:`BlockIndex.replicas_of`).

Protocol, driven by the master's sweeper (:meth:`Replicator.cycle`, twice a second):

1. Blocks committed since the last cycle (the index tells this module, as an observer) whose
   namespace wants more copies than they have are grouped by the node that holds them. So
   are the blocks of a namespace whose setting went up (``BlockIndex.replicas_raised``).
2. For each group, a target node is chosen on another host (not holding a copy yet, able to
   pull, with the most room), and DRAM slots are allocated on it.
3. The blocks are pinned and copied node to node (:func:`kvpool.master.copier.copy_blocks`:
   ``NodeControl.Pull`` under a READ capability the master signs per tenant): the bytes never
   pass through the master or the writer, and the target checks each block's checksum.
   Blocks it confirms become replicas (:meth:`BlockIndex.add_replica`); the other slots are
   freed. The pins end.

Each replica is its node's own copy: that node's DRAM policy evicts it (watermarks,
``make_room``, admin eviction) without touching the other copies, and demoting or evicting
the entry's own copy leaves the replicas alone. When the entry's node loses its last copy
(evicted, or the node died: :meth:`BlockIndex.forget_node`), a replica on a live node becomes
the copy clients read; removing the block frees every copy. Blocks that cannot be replicated now
(no other host has room) are tried again at a later cycle, until they leave memory.
"""

from __future__ import annotations

import logging

from kvpool.master.copier import copy_blocks
from kvpool.master.index import DRAM, BlockIndex, Entry

__all__ = ["Replicator"]

log = logging.getLogger("kvpool.replication")

BATCH_BLOCKS = 256


class Replicator:
    def __init__(self, index: BlockIndex) -> None:
        self.index = index
        self._queue: dict[bytes, Entry] = {}
        self.copied = 0
        index.observers.append(self)
        index.replicas_raised.append(self.raised)

    def _short(self, e: Entry) -> bool:
        """Whether ``e`` has a DRAM copy and fewer copies than its namespace wants."""
        return (not e.doomed and e.mem is not None and e.mem_tier == DRAM
                and 1 + len(e.replicas) < self.index.replicas_of(e.ns))

    # the index's observer -------------------------------------------------------------

    def stored(self, entries) -> None:
        wants: dict[str, int] = {}  # one setting lookup per namespace, not per block
        for e in entries:
            n = wants.get(e.ns)
            if n is None:
                n = wants[e.ns] = self.index.replicas_of(e.ns)
            if n > 1:
                self._queue[e.key] = e

    def raised(self, ns_id: str) -> None:
        """The namespace's replicas setting went up: its blocks need more copies."""
        self.stored(self.index.entries(ns_id))

    def removed(self, entries) -> None:
        for e in entries:
            self._queue.pop(e.key, None)

    def node_lost(self, entries) -> None:
        self.removed(entries)

    def namespace(self, ns) -> None:
        pass

    # the cycle ----------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def cycle(self) -> int:
        """Replicate what is queued; returns replicas made."""
        if not self._queue:
            return 0
        queue, self._queue = self._queue, {}
        # One group per source node and set of nodes holding copies already: every block of
        # a group can then go to the same target (a host with none of its copies).
        by_node: dict[tuple[int, tuple[int, ...]], list[Entry]] = {}
        for e in queue.values():
            if self._short(e):
                by_node.setdefault((e.node_id, tuple(sorted(r.node_id for r in e.replicas))), []).append(e)
        made = 0
        for (node_id, _), entries in by_node.items():
            for start in range(0, len(entries), BATCH_BLOCKS):
                batch = entries[start : start + BATCH_BLOCKS]
                done = await self._copy(node_id, batch)
                made += done
                for e in batch:  # not there yet: another cycle
                    if self._short(e):
                        self._queue[e.key] = e
        self.copied += made
        return made

    def _target(self, source, entries: list[Entry]):
        """A node on another host than every copy, with room for the batch's blocks (the
        blocks of a batch have their copies on the same nodes)."""
        nodes = self.index.nodes
        taken_hosts = {source.endpoint().host_id}
        for e in entries[:1]:
            taken_hosts |= {nodes.get(r.node_id).endpoint().host_id for r in e.replicas if nodes.get(r.node_id)}
        best = None
        size = entries[0].size
        for node in nodes:
            if node.endpoint().host_id in taken_hosts or DRAM not in node.tier_names():
                continue
            if not node.pulls_replicas:
                continue
            room = node.free_slots_for(DRAM, size)
            if room >= len(entries) and (best is None or room > best[0]):
                best = (room, node)
        return None if best is None else best[1]

    async def _copy(self, node_id: int, entries: list[Entry]) -> int:
        index = self.index
        source = index.nodes.get(node_id)
        if source is None or not source.endpoint().tcp_address or not source.data_key:
            return 0
        target = self._target(source, entries)
        if target is None:
            return 0
        slots = []
        for e in entries:
            slot = target.allocate(DRAM, e.size)
            if slot is None:
                break
            slots.append(slot)
        entries = entries[: len(slots)]
        for e in entries:
            index.pin(e)
        made = 0
        try:
            result = await copy_blocks(source, target, DRAM, entries, slots, "replicate")
            for i, (e, slot) in enumerate(zip(entries, slots)):
                if i in result.copied and index.add_replica(e, target.node_id, DRAM, slot):
                    made += 1
                else:
                    target.free(DRAM, slot)
        finally:
            for e in entries:
                index.unpin(e)
        return made
