"""Draining a node before maintenance (``kvpool admin drain NODE``).

Protocol of one :meth:`Drainer.drain` call (the Admin ``Drain`` RPC; the CLI repeats it until
nothing is left, showing progress):

1. The node is marked draining (``BlockIndex.draining``): placement gives it no new blocks
   from now on, until ``resume``.
2. Up to ``max_blocks`` of its committed blocks that no reader leases are taken, in index order.
3. With ``drop`` they are removed (``BlockIndex.remove``), as ``kvpool admin flush`` would.
4. Otherwise they move. NVMe-only blocks are first promoted into the node's own DRAM (the
   data plane serves memory tiers only). Then, per batch: the master allocates slots on
   another node (``BlockIndex.place``), pins the blocks, and copies them node to node with
   the same copy replicas use (:func:`kvpool.master.copier.copy_blocks`: a read capability
   per tenant, ``NodeControl.Pull``, each block's xxh3-64 verified as it arrives).
5. After the copy, a block that is still committed and pinned only by the drain is
   relocated (``BlockIndex.relocate``: the index points at the new slot, the old copies are
   freed). A block that a reader leased meanwhile keeps its old place (its target slot is
   freed) and moves on a later call. A block that failed its checksum is dropped and counted
   corrupt, as when a client finds one.

Invariants: a leased block is never moved or freed; no block is served from a slot that has
not passed its checksum; the master never touches the bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvpool.errors import FailedPrecondition, KvpoolError, NotFound
from kvpool.master.copier import copy_blocks
from kvpool.master.index import BlockIndex, Entry
from kvpool.master.nodes import NodeHandle
from kvpool.master.tiering import Tiering

__all__ = ["Drainer", "DrainReport", "DEFAULT_BATCH"]

log = logging.getLogger("kvpool.master")

#: Blocks moved per Drain call when the caller does not say.
DEFAULT_BATCH = 256


@dataclass
class DrainReport:
    node: NodeHandle
    moved: int = 0
    moved_bytes: int = 0
    dropped: int = 0
    failed: int = 0
    first_error: str = ""
    remaining: int = 0
    leased: int = 0


class Drainer:
    def __init__(self, index: BlockIndex, tiering: Tiering | None) -> None:
        self.index = index
        self.tiering = tiering

    def find(self, name_or_id: str) -> NodeHandle:
        for node in self.index.nodes:
            if node.name == name_or_id or str(node.node_id) == name_or_id:
                return node
        known = ", ".join(f"{n.name} (id {n.node_id})" for n in self.index.nodes) or "none"
        raise NotFound(f"Drain: no node {name_or_id!r}; nodes: {known} (see kvpool admin nodes)")

    def resume(self, node: NodeHandle) -> None:
        self.index.draining.discard(node.node_id)
        log.info("node %s takes new blocks again", node.name)

    async def drain(self, node: NodeHandle, *, drop: bool, max_blocks: int = DEFAULT_BATCH) -> DrainReport:
        index = self.index
        if node.node_id not in index.draining:
            index.draining.add(node.node_id)
            log.info("draining node %s: no new blocks go there", node.name)
        report = DrainReport(node)
        todo = [e for e in index.entries() if e.node_id == node.node_id and not e.pins][:max_blocks]
        if drop:
            report.dropped = index.remove([e.key for e in todo])[0]
        elif todo:
            await self._move(node, todo, report)
        left = [e for e in index.entries() if e.node_id == node.node_id]
        report.remaining = len(left)
        report.leased = sum(1 for e in left if e.pins)
        return report

    async def _move(self, source: NodeHandle, todo: list[Entry], report: DrainReport) -> None:
        index = self.index
        if self.tiering is not None and any(e.mem is None for e in todo):
            for e in todo:
                index.pin(e)
            try:
                resident = await self.tiering.make_resident(todo)
            finally:
                for e in todo:
                    index.unpin(e)
            todo = [e for e, ok in zip(todo, resident) if ok]
        todo = [e for e in todo if e.mem is not None and not e.pins and not e.doomed]
        if not todo:
            return
        try:
            target, tier = index.place(todo[0].size, len(todo), exclude=index.draining)
        except KvpoolError as exc:
            raise FailedPrecondition(f"Drain: no other node can take the blocks of {source.name} ({exc}); start "
                                     f"another node, or drop them with --drop") from None
        slots, batch = [], []
        for e in todo:
            slot = target.allocate(tier, e.size)
            if slot is None:
                break
            slots.append(slot)
            batch.append(e)
        if not batch:
            report.failed = len(todo)
            report.first_error = f"node {target.name} has no free {tier} slot; free memory there or add a node"
            return
        for e in batch:
            index.pin(e)
        await self._pull(source, target, tier, batch, slots, report)
        report.failed += len(todo) - len(batch)

    async def _pull(self, source: NodeHandle, target: NodeHandle, tier: str, batch: list[Entry], slots: list,
                    report: DrainReport) -> None:
        """Copy ``batch`` (pinned) from ``source`` into ``slots`` of ``target``, then relocate
        what may move; unpins every block of the batch."""
        index = self.index
        result = await copy_blocks(source, target, tier, batch, slots, "drain")
        if result.error and not report.first_error:
            report.first_error = result.error
        for i, (e, slot) in enumerate(zip(batch, slots)):
            if i not in result.copied and i not in result.corrupt:  # its group's copy failed: nothing lost
                index.unpin(e)
                target.free(tier, slot)
                report.failed += 1
                continue
            movable = e.pins == 1 and not e.doomed and i in result.copied and index.entry(e.key) is e
            if movable:
                index.relocate(e, target.node_id, tier, slot)
                report.moved += 1
                report.moved_bytes += slot.size
            else:
                target.free(tier, slot)
            index.unpin(e)
            if i in result.corrupt and not e.doomed:
                log.error("block %s failed its checksum while moving off %s: dropped, not served",
                          e.key.hex(), source.name)
                index.remove([e.key])
                index.counters.corrupt_blocks += 1
                report.failed += 1
