"""Removed blocks stay removed: a tombstone per copy until its node confirms the removal.

A node learns of a removal lazily. The free of a memory slot reaches it with the answer to
its next heartbeat (the journal of :mod:`kvpool.master.remote`), the drop of an NVMe copy
with the tiering task's next ``DropNvme``. Until then the node still holds the block, and
reports it if it registers again (its master restarted, failed over, or had declared it
dead). Adopted from that report, a block a client removed, or the pool evicted, would come
back.

Protocol:

* When a committed block leaves the index (``BlockIndex.observers.removed``: a client's
  Remove, a flush, an eviction, a checksum failure), one tombstone is made for each of its
  copies on a node in another process: node name, node incarnation, tier, slot offset and
  key. With Redis, each is written to ``PREFIX:removed`` in the same batch as the deletion
  of the block's record (:meth:`kvpool.master.metastore.RedisMeta.tombstones`).
* A memory copy's tombstone goes once its node applied the change that freed the slot: when
  the entry's storage is released (at its last unpin, for a leased one) the tombstone takes
  the node's newest journal number, and goes when the node's heartbeat says it applied that
  number. An NVMe copy's tombstone goes when ``DropNvme`` returned for it.
* A node registering reports its blocks: each reported block that a tombstone names (same
  node, tier, slot and key; for a memory tier also the same incarnation, since memory does
  not outlive the process, while NVMe does) is not adopted. Its slot is freed on the node
  (memory: a change in its journal; NVMe: a drop) and the tombstone stays until that is
  confirmed. The other tombstones of that node go: its report is complete, so it no longer
  holds those copies.
* The same key committed again into the same slot of the same node ends that slot's
  tombstone: the slot holds a committed block again.

A master that takes over loads the tombstones from Redis (``RedisMeta.load``) before its
nodes register. Without Redis, a restarted master has none: see
:meth:`kvpool.master.remote.RegistryServicer.push_removals` for how a client's Remove is made
durable at the node then.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvpool.master.index import NVME
from kvpool.tiers.base import Slot, TierCaps

__all__ = ["Tombstone", "Tombstones"]

log = logging.getLogger("kvpool.master")


@dataclass
class Tombstone:
    node: str
    incarnation: str
    tier: str
    offset: int
    key: bytes
    #: The copy is on a tier that outlives the node process (NVMe): matched across incarnations.
    persistent: bool
    #: The removed index entry while its storage may still be leased (None once known freed).
    entry: object = None
    #: Memory copies: the node's journal number at or after the free (0: not freed yet).
    seq: int = 0

    @property
    def slot_key(self) -> tuple[str, int, bytes]:
        return (self.tier, self.offset, self.key)

    @property
    def field(self) -> bytes:
        """Its name in Redis (``PREFIX:removed``): unique per copy; the key is last, raw."""
        flag = "p" if self.persistent else "m"
        return f"{self.node}\0{self.incarnation}\0{self.tier}\0{self.offset}\0{flag}\0".encode() + self.key

    @classmethod
    def from_field(cls, field: bytes) -> Tombstone:
        node, incarnation, tier, offset, flag, key = field.split(b"\0", 5)
        if flag not in (b"p", b"m") or not key:
            raise ValueError(f"unreadable tombstone {field[:40]!r}")
        return cls(node.decode(), incarnation.decode(), tier.decode(), int(offset), key, flag == b"p")


class Tombstones:
    """The master's tombstones, by node name; an observer of the index.

    ``joined(node_id)`` answers the node in another process with that id (a RemoteNode), or
    None: blocks of the node inside this process die with it and need none. ``store`` (the
    Redis metadata, when there is one) is told of tombstones made and ended:
    ``store.tombstones(put=fields, drop=fields)``.
    """

    def __init__(self, joined: Callable[[int], object | None]) -> None:
        self._joined = joined
        self._by_node: dict[str, dict[tuple[str, int, bytes], Tombstone]] = {}
        # Memory copies waiting for their free to be numbered (a heartbeat looks at each one
        # once, or again while it is leased), and those numbered, in the order of their
        # numbers, so that a heartbeat ends them from the front: per node name. An entry
        # that ended since is skipped when met (``_live``).
        self._unnumbered: dict[str, list[Tombstone]] = {}
        self._numbered: dict[str, deque[Tombstone]] = {}
        #: key -> how many tombstones name it: the commit path's check is one dict lookup.
        self._keys: dict[bytes, int] = {}
        self.store = None

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_node.values())

    def of(self, node_name: str) -> list[Tombstone]:
        return list(self._by_node.get(node_name, {}).values())

    def fields(self) -> list[bytes]:
        return [t.field for tombs in self._by_node.values() for t in tombs.values()]

    # ------------------------------------------------------------------ keeping them

    def _put(self, tombs: list[Tombstone]) -> None:
        dropped = []
        for t in tombs:
            old = self._by_node.setdefault(t.node, {}).get(t.slot_key)
            if old is not None:
                dropped.append(old)
                self._unkey(old.key)
            self._by_node[t.node][t.slot_key] = t
            self._keys[t.key] = self._keys.get(t.key, 0) + 1
            if not t.persistent:
                self._unnumbered.setdefault(t.node, []).append(t)
        if self.store is not None and tombs:
            self.store.tombstones(put=[t.field for t in tombs],
                                  drop=[t.field for t in dropped if t.field not in {n.field for n in tombs}])

    def _end(self, tombs: list[Tombstone]) -> None:
        for t in tombs:
            node = self._by_node.get(t.node)
            if node is None or node.get(t.slot_key) is not t:
                continue
            del node[t.slot_key]
            if not node:
                del self._by_node[t.node]
                self._unnumbered.pop(t.node, None)
                self._numbered.pop(t.node, None)
            self._unkey(t.key)
        if self.store is not None and tombs:
            self.store.tombstones(put=(), drop=[t.field for t in tombs])

    def _live(self, t: Tombstone) -> bool:
        return self._by_node.get(t.node, {}).get(t.slot_key) is t

    def _unkey(self, key: bytes) -> None:
        n = self._keys.get(key, 0) - 1
        if n > 0:
            self._keys[key] = n
        else:
            self._keys.pop(key, None)

    def load(self, fields: Iterable[bytes]) -> int:
        """Tombstones a master before this one wrote (Redis); returns how many were readable."""
        tombs = []
        for f in fields:
            try:
                tombs.append(Tombstone.from_field(f))
            except (ValueError, UnicodeDecodeError) as exc:
                log.warning("ignoring an unreadable tombstone in Redis: %s", exc)
        store, self.store = self.store, None  # they are in Redis already
        try:
            self._put(tombs)
        finally:
            self.store = store
        return len(tombs)

    # ------------------------------------------------------------------ the index's observer

    def namespace(self, info) -> None:
        pass

    def node_lost(self, entries) -> None:
        pass

    def _copy(self, node_id: int, tier: str, slot: Slot, key: bytes, entry) -> Tombstone | None:
        node = self._joined(node_id)
        if node is None:
            return None
        persistent = TierCaps.PERSISTENT in node.tier_caps().get(tier, TierCaps.NONE)
        return Tombstone(node.name, node.incarnation, tier, slot.offset, key, persistent, entry)

    def removed(self, entries) -> None:
        tombs = []
        for e in entries:
            copies = []
            for c in e.copies:  # every copy, each in every tier it occupies on its node
                if c.mem is not None:
                    copies.append((c.node_id, c.mem_tier, c.mem))
                if c.nvme is not None:
                    copies.append((c.node_id, NVME, c.nvme))
            for node_id, tier, slot in copies:
                t = self._copy(node_id, tier, slot, e.key, e)
                if t is not None:
                    tombs.append(t)
        self._put(tombs)

    def stored(self, entries) -> None:
        if not self._keys:
            return
        again = []
        for e in entries:
            if e.key not in self._keys:
                continue
            for c in e.copies:
                node = self._joined(c.node_id)
                tombs = self._by_node.get(node.name, {}) if node is not None else {}
                for tier, slot in ((c.mem_tier, c.mem), (NVME, c.nvme)):
                    t = tombs.get((tier, slot.offset, e.key)) if slot is not None else None
                    if t is not None:
                        again.append(t)
        self._end(again)

    # ------------------------------------------------------------------ confirmations

    def confirm(self, node) -> None:
        """``node`` (a RemoteNode) heartbeated or applied changes: end the tombstones of its
        memory copies whose free it has applied; number those freed since."""
        name = node.name
        waiting = self._unnumbered.get(name)
        if waiting:
            leased, seq = [], node.journal_seq
            numbered = self._numbered.setdefault(name, deque())
            for t in waiting:
                if not self._live(t) or t.incarnation != node.incarnation:
                    continue  # ended; or an earlier process's, which its next registration settles
                if t.entry is not None and t.entry.pins:
                    leased.append(t)  # its slot is freed at the last release
                    continue
                t.entry, t.seq = None, seq
                numbered.append(t)
            self._unnumbered[name] = leased
        numbered = self._numbered.get(name)
        if not numbered:
            return
        done, applied = [], node.applied_seq
        while numbered and numbered[0].seq <= applied:
            t = numbered.popleft()
            if self._live(t):
                done.append(t)
        self._end(done)

    def nvme_dropped(self, node, items) -> None:
        """``DropNvme`` returned for these ``(key, slot)`` of ``node``."""
        tombs = self._by_node.get(node.name)
        if not tombs:
            return
        done = []
        for key, slot in items:
            t = tombs.get((NVME, slot.offset, key))
            if t is not None:
                done.append(t)
        self._end(done)

    # ------------------------------------------------------------------ registration

    def sift(self, node, memory_blocks, nvme_blocks) -> tuple[list, list, list, list]:
        """Split a registering node's report (``memory_blocks``: ResidentBlock protos;
        ``nvme_blocks``: ``(key, slot, checksum, namespace)``) into the blocks to adopt and
        those a tombstone names, in that order: (memory kept, NVMe kept, memory dead, NVMe
        dead). Tombstones of this node that its report does not name end now."""
        tombs = self._by_node.get(node.name)
        if not tombs:
            return list(memory_blocks), list(nvme_blocks), [], []
        memory, dead_memory, matched = [], [], set()
        for b in memory_blocks:
            t = tombs.get((b.tier, b.offset, b.key))
            if t is not None and not t.persistent and t.incarnation == node.incarnation:
                dead_memory.append(b)
                matched.add(t.slot_key)
            else:
                memory.append(b)
        nvme, dead_nvme = [], []
        for block in nvme_blocks:
            t = tombs.get((NVME, block[1].offset, block[0]))
            if t is not None and t.persistent:
                dead_nvme.append(block)
                matched.add(t.slot_key)
            else:
                nvme.append(block)
        self._end([t for t in tombs.values() if t.slot_key not in matched])
        # What stays waits for the free this registration sends (a new journal, numbered from 1).
        for t in tombs.values():
            t.entry, t.seq = None, 0
        self._unnumbered[node.name] = [t for t in tombs.values() if not t.persistent]
        self._numbered.pop(node.name, None)
        if dead_memory or dead_nvme:
            log.info("node %s reported %d removed blocks (tombstones): not served, freed on the node", node.name,
                     len(dead_memory) + len(dead_nvme))
        return memory, nvme, dead_memory, dead_nvme

    def free_on(self, node, dead_memory, dead_nvme, nvme_drops: dict) -> None:
        """Free on ``node`` the slots of the blocks :meth:`sift` found dead: memory slots
        through its journal (unless something else claimed the slot since: a block Redis
        listed there, whose bytes the node confirmed; then the node holds that one and the
        tombstone ends), NVMe copies through ``nvme_drops`` (the tiering task drops them)."""
        tombs = self._by_node.get(node.name, {})
        moot = []
        for b in dead_memory:
            slot = Slot(b.offset, b.size)
            t = tombs.get((b.tier, b.offset, b.key))
            if node.claim(b.tier, slot):
                node.free(b.tier, slot)
            elif t is not None:
                moot.append(t)
        self._end(moot)
        if dead_nvme:
            nvme_drops.setdefault(node.node_id, []).extend((key, slot) for key, slot, _, _ in dead_nvme)
