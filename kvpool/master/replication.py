"""Replicas: each committed block kept on ``replicas`` nodes of different hosts.

Protocol, driven by the master's sweeper (:meth:`Replicator.cycle`, twice a second):

1. Blocks committed since the last cycle (the index tells this module, as an observer) that
   have fewer than ``replicas`` copies are grouped by the node that holds them.
2. For each group, a target node is chosen on another host (not holding a copy yet, with a
   data server on the source, with the most room), and DRAM slots are allocated on it.
3. The blocks are pinned, and the target node is asked to pull them from the source's data
   server under a READ capability the master signs (``NodeControl.Replicate``): the bytes go
   node to node, never through the master or the writer, and the target checks each block's
   checksum. Blocks it confirms become replicas (:meth:`BlockIndex.add_replica`); the other
   slots are freed. The pins end.

A replica lives as long as the entry's memory copy: evicting, demoting or removing that copy
frees the replicas too. When a node is forgotten (it died), a replica on a live node becomes
the copy clients read (:meth:`BlockIndex.forget_node`). Blocks that cannot be replicated now
(no other host has room) are tried again at a later cycle, until they leave memory.
"""

from __future__ import annotations

import logging
import secrets

from kvpool.capability import expiry_ms, sign
from kvpool.master.index import DRAM, BlockIndex, Entry
from kvpool.transport.base import READ

__all__ = ["Replicator"]

log = logging.getLogger("kvpool.replication")

BATCH_BLOCKS = 256
COPY_TTL_S = 60.0


class Replicator:
    def __init__(self, index: BlockIndex, replicas: int) -> None:
        self.index = index
        self.replicas = replicas
        self._queue: dict[bytes, Entry] = {}
        self.copied = 0

    # the index's observer -------------------------------------------------------------

    def stored(self, entries) -> None:
        for e in entries:
            self._queue[e.key] = e

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
        by_node: dict[int, list[Entry]] = {}
        for e in queue.values():
            if not e.doomed and e.mem is not None and e.mem_tier == DRAM and 1 + len(e.replicas) < self.replicas:
                by_node.setdefault(e.node_id, []).append(e)
        made = 0
        for node_id, entries in by_node.items():
            for start in range(0, len(entries), BATCH_BLOCKS):
                batch = entries[start : start + BATCH_BLOCKS]
                done = await self._copy(node_id, batch)
                made += done
                for e in batch:  # not there yet: another cycle
                    if not e.doomed and e.mem is not None and 1 + len(e.replicas) < self.replicas:
                        self._queue[e.key] = e
        self.copied += made
        return made

    def _target(self, source, entries: list[Entry]):
        """A node on another host than every copy, with room for the batch's blocks."""
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
            copy_id = "replicate-" + secrets.token_hex(8)
            records = b"".join(e.record for e in entries)
            expires = expiry_ms(COPY_TTL_S)
            mac = sign(source.data_key, READ, copy_id, node_id, expires, records)
            try:
                held = await target.replicate(source, copy_id, expires, mac, records, entries, slots)
            except Exception as exc:  # the target or the source went away
                log.warning("replication of %d blocks from node %s to %s failed: %s", len(entries), source.name,
                            target.name, exc)
                held = set()
            for e, slot in zip(entries, slots):
                if e.key in held and index.add_replica(e, target.node_id, DRAM, slot):
                    made += 1
                else:
                    target.free(DRAM, slot)
        finally:
            for e in entries:
                index.unpin(e)
        return made
