"""Tier movement, as the master directs it: demotion, promotion, write-through, drops.

The master decides *what* moves (the index and its policies); the node's mover does the
I/O. This module is the asynchronous glue between them:

* **Demotion.** When a node's DRAM passes its high watermark, the DRAM policy's victims
  are copied to NVMe in batches; a victim that already has an NVMe copy just loses its
  DRAM copy. A full NVMe tier evicts by the NVMe policy and retries once; what still does
  not fit is evicted outright.
* **Promotion on hit.** A Lookup or Get that leases an NVMe-only block waits for it to be
  read back into DRAM (checksum verified) before answering. A block that fails its
  checksum is dropped and reported, and the read treats it as a miss: it is never served.
* **Write-through** (``--write-through``): committed blocks are copied to NVMe in the
  background and keep their DRAM copy.
* **Drops.** NVMe copies the index let go of are removed from the node's catalog and freed.

Every copy in flight holds a pin on its entry, so nothing being moved can be evicted,
freed or moved again; a lease taken meanwhile keeps the DRAM copy alive.
"""

from __future__ import annotations

import asyncio
import logging

from kvpool.master.index import DRAM, NVME, BlockIndex, Entry
from kvpool.master.nodes import NodeHandle, has_durable_tier

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
        drops, self.index.nvme_drops = self.index.nvme_drops, {}
        for node_id, items in drops.items():
            node = self.index.nodes.get(node_id)
            if node is not None and items:
                await node.drop_nvme(items)

    # ------------------------------------------------------------------ demotion

    async def demote(self, node: NodeHandle, want_bytes: int | None) -> tuple[int, int]:
        """Move DRAM victims of ``node`` to NVMe until ``want_bytes`` are free (None: all)."""
        index = self.index
        victims = index.victims(node.node_id, DRAM, want_bytes)
        freed = sum(v.size for v in victims)
        for v in victims:
            if v.nvme is not None:  # already durable: no I/O, just let the DRAM copy go
                index.drop_copy(v, DRAM)
                index.counters.demoted_blocks += 1
        moving = [v for v in victims if v.mem is not None]
        for v in moving:
            index.pin(v)
        try:
            for start in range(0, len(moving), BATCH_BLOCKS):
                await self._demote_batch(node, moving[start : start + BATCH_BLOCKS])
        finally:
            for v in moving:
                index.unpin(v)
        return len(victims), freed

    async def _demote_batch(self, node: NodeHandle, batch: list[Entry], retry: bool = True) -> None:
        index = self.index
        result = await node.demote([(e.key, e.mem, e.checksum, e.ns) for e in batch], keep_dram=False)
        moved = dict(result.moved)
        for e in batch:
            if e.key in moved:
                index.demoted(e, moved[e.key])
        failed_keys = {k for k, _ in result.failed}
        failed = [e for e in batch if e.key in failed_keys and not e.doomed]
        if result.failed:
            log.warning("demotion failed for %d block(s): %s", len(result.failed), result.failed[0][1])
        no_space_keys = set(result.no_space)
        no_space = [e for e in batch if e.key in no_space_keys and not e.doomed]
        if no_space and retry:
            # Make room on NVMe by its own policy, then try once more.
            index.evict_from(node.node_id, NVME, sum(e.size for e in no_space))
            await self.flush_drops()
            await self._demote_batch(node, no_space, retry=False)
            no_space = []
        for e in failed + no_space:
            # Nowhere to keep it: plain eviction, unless a reader leased it meanwhile (the
            # mover's own pin is the only one allowed): a leased block is never evicted.
            if e.pins == 1 and e.mem is not None:
                index.drop_copy(e, DRAM)
                tk = (node.node_id, DRAM)
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

    async def make_resident(self, entries: list[Entry]) -> list[bool]:
        """Promote the NVMe-only entries among ``entries`` (all pinned by the caller's lease).

        Returns, per entry, whether it now has a verified DRAM copy that may be served.
        """
        waits: list[asyncio.Future] = []
        by_node: dict[int, list[Entry]] = {}
        for e in entries:
            if e.mem is not None or e.doomed:
                continue
            fut = self._promotions.get(e.key)
            if fut is not None:
                waits.append(fut)
            else:
                self._promotions[e.key] = asyncio.get_running_loop().create_future()
                by_node.setdefault(e.node_id, []).append(e)
        for node_id, todo in by_node.items():
            try:
                await self._promote(self.index.nodes.get(node_id), todo)
            finally:
                for e in todo:
                    fut = self._promotions.pop(e.key)
                    if not fut.done():
                        fut.set_result(None)
        if waits:
            await asyncio.gather(*waits)
        return [e.mem is not None and not e.doomed for e in entries]

    async def _promote(self, node: NodeHandle, todo: list[Entry]) -> None:
        index = self.index
        items: list[tuple] = []
        for e in todo:
            slot = node.allocate(DRAM, e.size)
            if slot is None:
                index.make_room(node, DRAM, e.size, 1)
                slot = node.allocate(DRAM, e.size)
            if slot is None:
                break  # DRAM is full of pinned blocks: the rest stay misses for now
            items.append((e.key, e.nvme, e.checksum, slot))
        if not items:
            return
        by_key = {e.key: e for e in todo}
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
                index.promoted(by_key[key], dram_slot)
            elif key in bad:
                log.error("block %s failed its checksum on NVMe (%s): dropped, not served", key.hex(), bad[key])
                index.corrupt(by_key[key], dram_slot)
            else:  # neither promoted nor corrupt (the mover skipped it): not served
                node.free(DRAM, dram_slot)
