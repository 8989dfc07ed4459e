"""Tier movement, as the master directs it: demotion, promotion, write-through, drops.

The master decides *what* moves (the index and its policies); the node's mover does the
I/O. This module is the asynchronous glue between them:

* **Demotion.** Each tier passes its blocks down the node's chain, HBM -> DRAM -> NVMe.
  Every copy of a block is demoted on its own node, by that node's policies, whichever copy
  it is (the first one or a replica: :class:`kvpool.master.index.Copy`).
  When a node's HBM passes its high watermark, the HBM policy's victims are copied into
  DRAM slots on the same node (checksums verified there) and served from DRAM; DRAM makes
  room by its own policy first, and only a block that still finds no DRAM slot is evicted.
  When a node's DRAM passes its high watermark, the DRAM policy's victims are copied to
  NVMe in batches; a victim that already has an NVMe copy just loses its DRAM copy. A full
  NVMe tier evicts by the NVMe policy and retries once; what still does not fit is evicted
  outright.
* **Promotion on hit.** A Lookup or Get that leases a block with no copy in memory waits for
  one of its NVMe copies to be read back into DRAM on that copy's node (checksum verified)
  before answering: the copy on the reader's host when there is one, else the first copy. A
  copy that fails its checksum is dropped and reported (the block lives on in its other
  copies, if any), and the read treats the block as a miss: it is never served.
* **Write-through** (``--write-through``): committed blocks are copied to NVMe in the
  background and keep their DRAM copy.
* **Drops.** NVMe copies the index let go of are removed from the node's catalog and freed.

Every copy in flight holds a pin on its entry, so nothing being moved can be evicted,
freed or moved again; a lease taken meanwhile keeps the DRAM copy alive.
"""

from __future__ import annotations

import asyncio
import logging

from kvpool.errors import Unavailable
from kvpool.master.index import DRAM, NVME, BlockIndex, Entry
from kvpool.master.nodes import NodeHandle, has_durable_tier
from kvpool.tiers.base import TierCaps

__all__ = ["Tiering"]

log = logging.getLogger("kvpool.tiering")

BATCH_BLOCKS = 64


class Tiering:
    def __init__(self, index: BlockIndex, *, write_through: bool = False) -> None:
        self.index = index
        self.write_through = write_through
        self._promotions: dict[bytes, asyncio.Future] = {}

    def _node(self, entry: Entry) -> NodeHandle:
        return self.index.nodes.get(entry.node_id)

    @staticmethod
    def has_nvme(node: NodeHandle) -> bool:
        return has_durable_tier(node)

    def any_nvme(self) -> bool:
        return any(self.has_nvme(n) for n in self.index.nodes)

    # ------------------------------------------------------------------ background cycle

    async def cycle(self) -> None:
        """One pass of background work; the server runs it every sweep."""
        await self.flush_drops()
        if self.write_through:
            await self.write_through_committed()
        for node in self.index.nodes:
            caps = node.tier_caps()
            host = [t for t, c in caps.items() if TierCaps.HOST_SHARED in c]
            for tier in (t for t, c in caps.items() if TierCaps.DEVICE in c) if host else ():
                excess = self.index.over_watermark(node, tier)
                if excess:
                    await self.demote_memory(node, tier, host[0], excess)
            if not self.has_nvme(node):
                continue
            excess = self.index.over_watermark(node, DRAM)
            if excess:
                await self.demote(node, excess)
            excess = self.index.over_watermark(node, NVME)
            if excess:
                self.index.evict_from(node.node_id, NVME, excess)
        await self.flush_drops()

    async def flush_drops(self) -> None:
        """Have each node drop the NVMe copies the index let go. A node that does not answer
        gets them again on a later cycle (while it is registered: a node that registers again
        reports its NVMe blocks, and the master settles them then)."""
        drops, self.index.nvme_drops = self.index.nvme_drops, {}
        for node_id, items in drops.items():
            node = self.index.nodes.get(node_id)
            if node is None or not items:
                continue
            try:
                await node.drop_nvme(items)
            except Unavailable as exc:
                log.warning("NVMe drops of %d blocks on node %d wait for a later cycle: %s", len(items), node_id, exc)
                self.index.nvme_drops.setdefault(node_id, []).extend(items)

    # ------------------------------------------------------------------ demotion

    async def demote(self, node: NodeHandle, want_bytes: int | None) -> tuple[int, int]:
        """Move DRAM victims of ``node`` to NVMe until ``want_bytes`` are free (None: all).
        The victims are this node's copies, whichever copy of their block each one is."""
        index = self.index
        node_id = node.node_id
        victims = index.victims(node_id, DRAM, want_bytes)
        freed = sum(v.size for v in victims)
        moving = []
        for v in victims:
            if v.copy_on(node_id).nvme is not None:  # already durable: no I/O, just let DRAM go
                index.drop_copy(v, DRAM, node_id)
                index.counters.demoted_blocks += 1
            else:
                moving.append(v)
        for v in moving:
            index.pin(v)
        try:
            for start in range(0, len(moving), BATCH_BLOCKS):
                await self._demote_batch(node, moving[start : start + BATCH_BLOCKS])
        finally:
            for v in moving:
                index.unpin(v)
        return len(victims), freed

    async def demote_memory(self, node: NodeHandle, tier: str, target: str, want_bytes: int | None) -> tuple[int, int]:
        """Move victims of ``node``'s memory ``tier`` (HBM) into its host tier ``target``
        (DRAM) until ``want_bytes`` are free (None: all). Returns (blocks moved, blocks evicted).

        Blocks leased meanwhile stay where they are (a leased copy is never moved). On a node
        without NVMe, a block that finds no ``target`` slot even after ``target`` evicted by
        its own policy is evicted, as it would have been without a next tier.
        """
        index = self.index
        victims = index.victims(node.node_id, tier, want_bytes)
        if not victims:
            return 0, 0
        for v in victims:
            index.pin(v)
        moved = evicted = 0
        try:
            # With NVMe below, DRAM makes room by demoting (later in this cycle), so a block
            # without a DRAM slot now waits in HBM for the next cycle; without NVMe, DRAM
            # evicts by its own policy, and what still finds no slot is evicted from HBM.
            durable = self.has_nvme(node)
            node_id = node.node_id
            mine = {v.key: v.copy_on(node_id) for v in victims}
            slots = []
            for v in victims:
                slot = node.allocate(target, v.size)
                if slot is None and not durable:
                    index.make_room(node, target, v.size, len(victims) - len(slots))
                    slot = node.allocate(target, v.size)
                slots.append(slot)
            items = [(v.key, c.mem, v.checksum, v.ns, s) for v, s in zip(victims, slots)
                     if s is not None and (c := mine[v.key]) is not None and c.holds(tier)]
            try:
                done, corrupt = await node.move_tier(items, tier, target) if items else ([], [])
            except Exception as exc:  # the node went away or refused: nothing moved, nothing lost
                log.warning("moving %d block(s) from %s to %s on %s failed: %s", len(items), tier, target, node.name,
                            exc)
                done, corrupt = [], []
            done, corrupt = set(done), set(corrupt)
            for v, slot in zip(victims, slots):
                if slot is not None and v.key in done and index.moved_tier(v, target, slot, node_id):
                    moved += 1
                    continue
                if slot is not None:
                    node.free(target, slot)
                if v.key in corrupt and not v.doomed:
                    log.error("block %s failed its checksum moving from %s to %s on %s: dropped, not served",
                              v.key.hex(), tier, target, node.name)
                    index.remove([v.key])  # pinned by this move: freed at the unpin below
                    index.counters.corrupt_blocks += 1
                elif (slot is None and not durable and v.pins == 1 and mine[v.key] is not None
                      and mine[v.key].holds(tier)):
                    index.drop_copy(v, tier, node_id)  # no room below even after eviction: evict, as before
                    tk = (node_id, tier)
                    index.counters.evictions[tk] = index.counters.evictions.get(tk, 0) + 1
                    evicted += 1
        finally:
            for v in victims:
                index.unpin(v)
        return moved, evicted

    async def _demote_batch(self, node: NodeHandle, batch: list[Entry], retry: bool = True) -> None:
        index = self.index
        node_id = node.node_id
        copies = [(e, c) for e in batch if (c := e.copy_on(node_id)) is not None and c.mem is not None]
        batch = [e for e, _ in copies]
        result = await node.demote([(e.key, c.mem, e.checksum, e.ns) for e, c in copies], keep_dram=False)
        moved = dict(result.moved)
        for e in batch:
            if e.key in moved:
                index.demoted(e, moved[e.key], node_id)
        failed_keys = {k for k, _ in result.failed}
        failed = [e for e in batch if e.key in failed_keys and not e.doomed]
        if result.failed:
            log.warning("demotion failed for %d block(s): %s", len(result.failed), result.failed[0][1])
        no_space_keys = set(result.no_space)
        no_space = [e for e in batch if e.key in no_space_keys and not e.doomed]
        if no_space and retry:
            # Make room on NVMe by its own policy, then try once more.
            index.evict_from(node_id, NVME, sum(e.size for e in no_space))
            await self.flush_drops()
            await self._demote_batch(node, no_space, retry=False)
            no_space = []
        for e in failed + no_space:
            # Nowhere to keep it: plain eviction, unless a reader leased it meanwhile (the
            # mover's own pin is the only one allowed): a leased block is never evicted.
            c = e.copy_on(node_id)
            if e.pins == 1 and c is not None and c.mem is not None:
                index.drop_copy(e, DRAM, node_id)
                tk = (node_id, DRAM)
                index.counters.evictions[tk] = index.counters.evictions.get(tk, 0) + 1

    # ------------------------------------------------------------------ write-through

    async def write_through_committed(self) -> None:
        index = self.index
        pending, index.committed = index.committed, []
        todo = [e for e in pending if not e.doomed and e.mem is not None and e.nvme is None
                and self.has_nvme(self._node(e))]
        for e in todo:
            index.pin(e)
        try:
            for start in range(0, len(todo), BATCH_BLOCKS):
                batch = todo[start : start + BATCH_BLOCKS]
                node = self._node(batch[0])
                result = await node.demote([(e.key, e.mem, e.checksum, e.ns) for e in batch], keep_dram=True)
                moved = dict(result.moved)
                for e in batch:
                    if e.key in moved:
                        index.written_through(e, moved[e.key])
                if result.no_space:
                    log.warning("write-through: NVMe has no room for %d block(s)", len(result.no_space))
        finally:
            for e in todo:
                index.unpin(e)

    # ------------------------------------------------------------------ promotion

    async def make_resident(self, entries: list[Entry], client_host: str = "") -> list[bool]:
        """Promote the entries among ``entries`` (all pinned by the caller's lease) that have
        no copy in memory: each one's NVMe copy on ``client_host`` when it has one there,
        else its first copy.

        Returns, per entry, whether it now has a verified memory copy that may be served.
        """
        waits: list[asyncio.Future] = []
        by_node: dict[int, list[Entry]] = {}
        nodes = self.index.nodes
        for e in entries:
            if e.mem is not None or e.doomed:
                continue
            fut = self._promotions.get(e.key)
            if fut is not None:
                waits.append(fut)
                continue
            self._promotions[e.key] = asyncio.get_running_loop().create_future()
            node_id = e.node_id
            if client_host and len(e.copies) > 1:
                for c in e.copies:
                    node = nodes.get(c.node_id)
                    if c.nvme is not None and node is not None and node.endpoint().host_id == client_host:
                        node_id = c.node_id
                        break
            by_node.setdefault(node_id, []).append(e)
        for node_id, todo in by_node.items():
            try:
                node = nodes.get(node_id)
                if node is not None:
                    await self._promote(node, todo)
            finally:
                for e in todo:
                    fut = self._promotions.pop(e.key)
                    if not fut.done():
                        fut.set_result(None)
        if waits:
            await asyncio.gather(*waits)
        return [e.mem is not None and not e.doomed for e in entries]

    async def _promote(self, node: NodeHandle, todo: list[Entry]) -> None:
        """Read ``todo``'s NVMe copies on ``node`` into DRAM slots there."""
        index = self.index
        node_id = node.node_id
        items: list[tuple] = []
        by_key: dict[bytes, Entry] = {}
        for e in todo:
            c = e.copy_on(node_id)
            if c is None or c.nvme is None or c.mem is not None:
                continue
            slot = node.allocate(DRAM, e.size)
            if slot is None:
                index.make_room(node, DRAM, e.size, 1)
                slot = node.allocate(DRAM, e.size)
            if slot is None:
                break  # DRAM is full of pinned blocks: the rest stay misses for now
            items.append((e.key, c.nvme, e.checksum, slot))
            by_key[e.key] = e
        if not items:
            return
        try:
            result = await node.promote(items)
        except BaseException:
            for _, _, _, dram_slot in items:
                node.free(DRAM, dram_slot)
            raise
        good = set(result.promoted)
        bad = dict(result.corrupt)
        for key, _, _, dram_slot in items:
            if key in good:
                index.promoted(by_key[key], dram_slot, node_id)
            elif key in bad:
                log.error("block %s failed its checksum on NVMe of %s (%s): that copy is dropped, not served",
                          key.hex(), node.name, bad[key])
                index.corrupt(by_key[key], dram_slot, node_id)
            else:  # neither promoted nor corrupt (the mover skipped it): not served
                node.free(DRAM, dram_slot)
