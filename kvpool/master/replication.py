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

**Read-driven replicas** (``kvpool master --read-replicas K``, off by default): a block that
readers on one host fetch from another host ``READ_COPY_AFTER`` times gains a copy on a node of
that host (one that can pull), so the next reads there are local. Bounded: a block has at most
``K`` copies beyond its namespace's replicas, and the read counts are forgotten when more than
``READ_COUNTS_MAX`` are kept. Such copies are replicas like the others.

A replica is a copy like the block's first one (:class:`kvpool.master.index.Copy`): its
node's policies demote it (DRAM to that node's NVMe when it has one, else evicted: watermarks,
``make_room``, admin eviction) and promote it on a read from its host, without touching the
other copies. A copy on NVMe counts: it survives its node's restart. When the first copy goes
(evicted, or the node died: :meth:`BlockIndex.forget_node`), another copy, in memory if one
is, becomes the copy clients read; removing the block frees every copy. Blocks that cannot
be replicated now (no other host has room) are tried again at a later cycle, until they
leave memory. After a master restart, the copies the nodes report are adopted back as copies
of one block (:meth:`BlockIndex.adopt_memory`, :meth:`BlockIndex.adopt`), so nothing is
copied again.
"""

from __future__ import annotations

import logging

from kvpool.master.copier import copy_blocks
from kvpool.master.index import DRAM, BlockIndex, Entry

__all__ = ["Replicator"]

log = logging.getLogger("kvpool.replication")

BATCH_BLOCKS = 256
#: Reads from one host, served from another, after which a block gains a copy on that host.
READ_COPY_AFTER = 3
#: Most (block, host) read counts kept; beyond it they start again from zero.
READ_COUNTS_MAX = 100_000


class Replicator:
    def __init__(self, index: BlockIndex) -> None:
        self.index = index
        self._queue: dict[bytes, Entry] = {}
        #: Blocks to copy to a host that reads them (read-driven): key -> (entry, host id).
        self._to_host: dict[bytes, tuple[Entry, str]] = {}
        self._reads: dict[tuple[bytes, str], int] = {}
        self.copied = 0
        index.observers.append(self)
        index.replicas_raised.append(self.raised)
        index.copies_lost.append(self.stored)  # a node died: its copies are made again elsewhere

    def _short(self, e: Entry) -> bool:
        """Whether ``e`` has a DRAM copy and fewer copies than its namespace wants."""
        return (not e.doomed and e.mem is not None and e.mem_tier == DRAM
                and len(e.copies) < self.index.replicas_of(e.ns))

    def read(self, served, host: str) -> None:
        """Readers on ``host`` were sent to ``served`` (entries, or replicas dressed as them):
        count the copies on other hosts, and queue a copy to ``host`` for a block read often."""
        nodes = self.index.nodes
        far: dict[int, bool] = {}
        for e in served:
            node_id = e.node_id
            if node_id not in far:
                node = nodes.get(node_id)
                far[node_id] = node is not None and node.endpoint().host_id != host
            if not far[node_id]:
                continue
            key = (e.key, host)
            n = self._reads.get(key, 0) + 1
            if n < READ_COPY_AFTER:
                if len(self._reads) >= READ_COUNTS_MAX:
                    self._reads.clear()
                self._reads[key] = n
                continue
            self._reads.pop(key, None)
            entry = self.index.entry(e.key)
            bound = self.index.replicas_of(entry.ns) + self.index.config.read_replicas if entry is not None else 0
            if entry is not None and len(entry.copies) < bound:
                self._to_host[e.key] = (entry, host)

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
        return len(self._queue) + len(self._to_host)

    async def cycle(self) -> int:
        """Replicate what is queued; returns replicas made."""
        made = await self._copy_to_readers() if self._to_host else 0
        if not self._queue:
            self.copied += made
            return made
        queue, self._queue = self._queue, {}
        # One group per source node and set of nodes holding copies already: every block of
        # a group can then go to the same target (a host with none of its copies).
        by_node: dict[tuple[int, tuple[int, ...]], list[Entry]] = {}
        for e in queue.values():
            if self._short(e):
                by_node.setdefault((e.node_id, tuple(sorted(r.node_id for r in e.replicas))), []).append(e)
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

    async def _copy_to_readers(self) -> int:
        """Copy blocks read often from afar to a node on their readers' host (best effort:
        a block that finds no node or room there is not tried again until read again)."""
        todo, self._to_host = self._to_host, {}
        groups: dict[tuple[int, str], list[Entry]] = {}
        for e, host in todo.values():
            if (not e.doomed and e.mem is not None and e.mem_tier == DRAM
                    and not any(self._host(r.node_id) == host for r in e.replicas)):
                groups.setdefault((e.node_id, host), []).append(e)
        made = 0
        for (node_id, host), entries in groups.items():
            for start in range(0, len(entries), BATCH_BLOCKS):
                made += await self._copy(node_id, entries[start : start + BATCH_BLOCKS], host)
        return made

    def _host(self, node_id: int) -> str | None:
        node = self.index.nodes.get(node_id)
        return None if node is None else node.endpoint().host_id

    def _target(self, source, entries: list[Entry], host: str | None = None):
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
            if host is not None and node.endpoint().host_id != host:
                continue
            if not node.pulls_replicas:
                continue
            room = node.free_slots_for(DRAM, size)
            if room >= len(entries) and (best is None or room > best[0]):
                best = (room, node)
        return None if best is None else best[1]

    async def _copy(self, node_id: int, entries: list[Entry], host: str | None = None) -> int:
        index = self.index
        source = index.nodes.get(node_id)
        if source is None or not source.endpoint().tcp_address or not source.data_key:
            return 0
        target = self._target(source, entries, host)
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
