"""TierMover with a real DRAM arena (shm), a real NVMe slot file and a real LMDB catalog."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kvpool.errors import PoolFull
from kvpool.node.catalog import NvmeCatalog
from kvpool.node.mover import DemoteItem, PromoteItem, TierMover, checksum
from kvpool.tiers.base import Slot
from kvpool.tiers.dram import DramArena
from kvpool.tiers.nvme import SLOT_FILE, NvmeArena

MiB = 1 << 20
BLOCK = 256 << 10


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


class Node:
    """The pieces a node wires together, opened on one data dir."""

    def __init__(self, data_dir: str, *, dram_bytes: int = 16 * MiB, nvme_bytes: int = 16 * MiB,
                 chunk: int = 4 * MiB, dram: DramArena | None = None, **nvme_kw) -> None:
        self.own_dram = dram is None
        self.dram = dram or DramArena(dram_bytes, chunk_bytes=chunk)
        self.nvme = NvmeArena(data_dir, nvme_bytes, chunk_bytes=chunk, **nvme_kw)
        self.catalog = NvmeCatalog(data_dir)
        self.mover = TierMover(self.dram, self.nvme, self.catalog)

    def put(self, i: int, size: int = BLOCK) -> DemoteItem:
        """A DRAM block with distinct random bytes, as a demote item."""
        s = self.dram.allocate(size)
        self.dram.array[s.offset : s.offset + size] = np.random.default_rng(i).integers(
            0, 256, size, dtype=np.uint8)
        return DemoteItem(key(i), s, checksum(self.dram.view(s)), f"ns{i % 3}")

    def close(self) -> None:
        self.mover.close()
        self.catalog.close()
        self.nvme.close()
        if self.own_dram:
            self.dram.close()


@pytest.fixture
def node(tmp_path):
    n = Node(str(tmp_path))
    yield n
    n.close()


def promote_items(n: Node, items, moved) -> list[PromoteItem]:
    nvme_of = dict(moved)
    return [PromoteItem(it.key, nvme_of[it.key], it.checksum, n.dram.allocate(it.dram_slot.size))
            for it in items]


def test_demote_then_promote_round_trip(node):
    items = [node.put(i) for i in range(12)]
    res = asyncio.run(node.mover.demote(items))
    assert not res.no_space and not res.failed and not res.keep_dram
    assert [k for k, _ in res.moved] == [it.key for it in items]
    assert res.bytes_moved == 12 * BLOCK
    assert node.nvme.used_bytes == 12 * BLOCK
    for it, (k, slot) in zip(items, res.moved):
        e = node.catalog.get(k)
        assert (e.slot, e.checksum, e.namespace) == (slot, it.checksum, it.namespace)
    originals = {it.key: bytes(node.dram.view(it.dram_slot)) for it in items}
    for it in items:  # the node frees demoted DRAM slots; the mover never does
        assert node.dram.slots.is_allocated(it.dram_slot)
        node.dram.free(it.dram_slot)

    back = promote_items(node, items, res.moved)
    pres = asyncio.run(node.mover.promote(back))
    assert pres.promoted == [it.key for it in items] and not pres.corrupt
    for p in back:
        assert bytes(node.dram.view(p.dram_slot)) == originals[p.key]
    assert len(node.catalog) == 12  # promote keeps the NVMe copy by default
    st = node.mover.stats
    assert (st.demoted_blocks, st.demoted_bytes) == (12, 12 * BLOCK)
    assert (st.promoted_blocks, st.promoted_bytes, st.corrupt_blocks) == (12, 12 * BLOCK, 0)


def test_promote_can_drop_the_nvme_copy(node):
    items = [node.put(i) for i in range(3)]
    res = asyncio.run(node.mover.demote(items))
    pres = asyncio.run(node.mover.promote(promote_items(node, items, res.moved), keep_nvme=False))
    assert len(pres.promoted) == 3 and not pres.kept_nvme
    assert len(node.catalog) == 0 and node.nvme.used_bytes == 0


def test_write_through_keeps_dram(node):
    items = [node.put(i) for i in range(4)]
    before = [bytes(node.dram.view(it.dram_slot)) for it in items]
    res = asyncio.run(node.mover.write_through(items))
    assert res.keep_dram and len(res.moved) == 4
    assert [bytes(node.dram.view(it.dram_slot)) for it in items] == before
    assert node.mover.stats.written_through_blocks == 4 and node.mover.stats.demoted_blocks == 0
    assert len(node.catalog) == 4


def test_mixed_sizes_and_unaligned_blocks(node):
    items = [node.put(0, 4096), node.put(1, MiB), node.put(2, 1000), node.put(3, 3 * 4096)]
    res = asyncio.run(node.mover.demote(items))
    assert len(res.moved) == 4
    back = promote_items(node, items, res.moved)
    pres = asyncio.run(node.mover.promote(back))
    assert len(pres.promoted) == 4
    for it, p in zip(items, back):
        assert bytes(node.dram.view(p.dram_slot)) == bytes(node.dram.view(it.dram_slot))


def test_nvme_without_free_slots_is_a_result(tmp_path):
    n = Node(str(tmp_path), nvme_bytes=4 * MiB, chunk=MiB)
    try:
        items = [n.put(i) for i in range(20)]  # 5 MiB into 4 MiB
        res = asyncio.run(n.mover.demote(items))
        assert len(res.moved) == 16 and res.no_space == [it.key for it in items[16:]]
        assert isinstance(res.pool_full(), PoolFull)
        assert len(n.catalog) == 16 and n.mover.stats.no_space_blocks == 4
        # The caller evicts from NVMe, then the rest fits.
        asyncio.run(n.mover.drop(res.moved[:4]))
        assert len(n.catalog) == 12
        again = asyncio.run(n.mover.demote(items[16:]))
        assert len(again.moved) == 4 and again.pool_full() is None
    finally:
        n.close()


def test_flipped_byte_is_reported_and_never_served(node, caplog):
    items = [node.put(i) for i in range(6)]
    res = asyncio.run(node.mover.demote(items))
    victim_key, victim_slot = res.moved[2]
    fd = os.open(node.nvme.path, os.O_RDWR)
    try:
        pos = victim_slot.offset + 12345
        b = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), pos)
        os.fsync(fd)
    finally:
        os.close(fd)
    back = promote_items(node, items, res.moved)
    with caplog.at_level(logging.ERROR, logger="kvpool.node.mover"):
        pres = asyncio.run(node.mover.promote(back))
    assert victim_key not in pres.promoted
    assert [k for k, _ in pres.corrupt] == [victim_key] and "checksum" in pres.corrupt[0][1]
    assert sorted(pres.promoted) == sorted(k for k, _ in res.moved if k != victim_key)
    assert node.catalog.get(victim_key) is None
    assert not node.nvme.slots.is_allocated(victim_slot)
    assert node.mover.stats.corrupt_blocks == 1
    assert any(victim_key.hex() in r.getMessage() for r in caplog.records)


def test_restart_recovers_the_same_bytes(tmp_path):
    n = Node(str(tmp_path))
    items = [n.put(i) for i in range(10)]
    res = asyncio.run(n.mover.demote(items))
    originals = {it.key: bytes(n.dram.view(it.dram_slot)) for it in items}
    asyncio.run(n.mover.drop(res.moved[:2]))  # evicted before the restart: must stay gone
    n.close()

    m = Node(str(tmp_path))
    try:
        entries = m.mover.recover()
        assert sorted(e.key for e in entries) == sorted(it.key for it in items[2:])
        assert m.nvme.used_bytes == 8 * BLOCK
        # New demotions never land on recovered slots.
        extra = asyncio.run(m.mover.demote([m.put(100)]))
        assert extra.moved[0][1] not in {e.slot for e in entries}
        back = [PromoteItem(e.key, e.slot, e.checksum, m.dram.allocate(e.size)) for e in entries]
        pres = asyncio.run(m.mover.promote(back))
        assert len(pres.promoted) == 8 and not pres.corrupt
        for p in back:
            assert bytes(m.dram.view(p.dram_slot)) == originals[p.key]
    finally:
        m.close()


def test_restart_drops_a_corrupted_block(tmp_path):
    n = Node(str(tmp_path))
    res = asyncio.run(n.mover.demote([n.put(i) for i in range(4)]))
    n.close()
    with open(os.path.join(str(tmp_path), SLOT_FILE), "r+b") as f:
        f.seek(res.moved[0][1].offset)
        f.write(b"\x00" * 64)
    m = Node(str(tmp_path))
    try:
        entries = m.mover.recover()
        back = [PromoteItem(e.key, e.slot, e.checksum, m.dram.allocate(e.size)) for e in entries]
        pres = asyncio.run(m.mover.promote(back))
        assert [k for k, _ in pres.corrupt] == [res.moved[0][0]] and len(pres.promoted) == 3
        assert len(m.catalog) == 3
    finally:
        m.close()


def test_disk_full_is_a_result_and_loses_nothing(mount_point):
    # A 6 MiB filesystem under a 16 MiB sparse arena: the disk fills before the arena does.
    data_dir = mount_point("tmpfs", "size=6m")
    n = Node(data_dir, dram_bytes=32 * MiB, nvme_bytes=16 * MiB, chunk=MiB, preallocate=False)
    try:
        first = [n.put(i, MiB) for i in range(3)]
        r1 = asyncio.run(n.mover.demote(first))
        assert len(r1.moved) == 3
        second = [n.put(10 + i, MiB) for i in range(8)]
        r2 = asyncio.run(n.mover.demote(second))
        assert r2.no_space and isinstance(r2.pool_full(), PoolFull)
        assert len(r2.moved) + len(r2.no_space) == 8 and not r2.failed
        moved = r1.moved + r2.moved
        assert n.nvme.used_bytes == len(moved) * MiB  # failed slots were freed
        assert sorted(e.key for e in n.catalog) == sorted(k for k, _ in moved)
        for k in r2.no_space:
            assert n.catalog.get(k) is None
        # Nothing committed is lost, and every entry still verifies.
        everything = first + second
        by_key = {it.key: it for it in everything}
        back = [PromoteItem(k, s, by_key[k].checksum, n.dram.allocate(MiB)) for k, s in moved]
        pres = asyncio.run(n.mover.promote(back))
        assert len(pres.promoted) == len(moved) and not pres.corrupt
        for p in back:
            assert bytes(n.dram.view(p.dram_slot)) == bytes(n.dram.view(by_key[p.key].dram_slot))
        # The DRAM copies of what did not fit are untouched.
        for k in r2.no_space:
            it = by_key[k]
            assert checksum(n.dram.view(it.dram_slot)) == it.checksum
    finally:
        n.close()
    with NvmeCatalog(data_dir) as cat:  # and the catalog reopens intact
        assert len(cat.load_verified(16 * MiB, chunk_bytes=MiB)) == len(moved)


def test_cancelled_demotion_commits_nothing(node):
    items = [node.put(i, MiB) for i in range(8)]

    async def go():
        task = asyncio.ensure_future(node.mover.demote(items))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert len(node.catalog) == 0 and node.nvme.used_bytes == 0


def test_promote_rejects_mismatched_sizes(node):
    it = node.put(0)
    res = asyncio.run(node.mover.demote([it]))
    with pytest.raises(ValueError):
        asyncio.run(node.mover.promote(
            [PromoteItem(it.key, res.moved[0][1], it.checksum, Slot(0, 4096))]))


CHILD = textwrap.dedent("""
    import asyncio, sys, numpy as np
    from kvpool.tiers.dram import DramArena
    from kvpool.tiers.nvme import NvmeArena
    from kvpool.node.catalog import NvmeCatalog
    from kvpool.node.mover import TierMover, DemoteItem, checksum
    data_dir, shm = sys.argv[1], sys.argv[2]
    dram = DramArena(16 << 20, chunk_bytes=4 << 20, segment_name=shm)
    nvme = NvmeArena(data_dir, 8 << 20, chunk_bytes=4 << 20)
    mover = TierMover(dram, nvme, NvmeCatalog(data_dir))
    rng = np.random.default_rng(0)

    async def main():
        history, n = [], 0
        while True:
            items = []
            for _ in range(6):
                s = dram.allocate(256 << 10)
                dram.array[s.offset:s.offset + s.size] = rng.integers(0, 256, s.size,
                                                                      dtype=np.uint8)
                items.append(DemoteItem(n.to_bytes(16, "big"), s, checksum(dram.view(s)), "x"))
                n += 1
            res = await mover.demote(items)
            for it in items:
                dram.free(it.dram_slot)
            history.append(res.moved)
            if len(history) > 2:  # evict the oldest batch: its slots get rewritten next
                await mover.drop(history.pop(0))
            print("batch", flush=True)

    asyncio.run(main())
""")


def test_kill_9_during_demotion_leaves_no_bad_entry(tmp_path):
    data_dir = str(tmp_path / "data")
    shm = f"kvpool-test-kill-{os.getpid()}"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), data_dir, shm],
                             stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(5):  # let it run and recycle slots for a while, then kill it mid-batch
            assert child.stdout.readline().startswith("batch")
        time.sleep(0.15)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        try:
            os.unlink(f"/dev/shm/{shm}")
        except FileNotFoundError:
            pass
    n = Node(data_dir, nvme_bytes=8 * MiB)
    try:
        entries = n.mover.recover()
        assert entries
        back = [PromoteItem(e.key, e.slot, e.checksum, n.dram.allocate(e.size)) for e in entries]
        pres = asyncio.run(n.mover.promote(back))
        assert not pres.corrupt and len(pres.promoted) == len(entries)
    finally:
        n.close()


def test_catalog_commit_follows_fdatasync_once_per_batch(tmp_path):
    events = []

    class RecordingArena(NvmeArena):
        def sync(self):
            super().sync()
            events.append("sync")

    class RecordingCatalog(NvmeCatalog):
        def put_many(self, entries):
            entries = list(entries)
            events.append(("put", len(entries)))
            super().put_many(entries)

    dram = DramArena(16 * MiB, chunk_bytes=4 * MiB)
    nvme = RecordingArena(str(tmp_path), 16 * MiB, chunk_bytes=4 * MiB)
    catalog = RecordingCatalog(str(tmp_path))
    mover = TierMover(dram, nvme, catalog)
    try:
        for batch in range(2):
            items = []
            for i in range(5):
                s = dram.allocate(BLOCK)
                items.append(DemoteItem(key(batch * 10 + i), s, checksum(dram.view(s)), ""))
            asyncio.run(mover.demote(items))
        assert events == ["sync", ("put", 5), "sync", ("put", 5)]
    finally:
        mover.close()
        catalog.close()
        nvme.close()
        dram.close()


def test_demoting_a_block_again(node):
    it = node.put(0)
    first = asyncio.run(node.mover.write_through([it]))
    # Same bytes: already there, nothing written, same slot.
    same = asyncio.run(node.mover.demote([it]))
    assert same.moved == first.moved and same.bytes_moved == 0
    assert node.mover.stats.demoted_blocks == 0
    # Other bytes under the same key: a new slot, and the old one is freed, not leaked.
    node.dram.array[it.dram_slot.offset] ^= 0xFF
    changed = it._replace(checksum=checksum(node.dram.view(it.dram_slot)))
    second = asyncio.run(node.mover.demote([changed]))
    assert second.moved[0][1] != first.moved[0][1] and second.bytes_moved == BLOCK
    assert node.catalog.get(it.key).slot == second.moved[0][1]
    assert node.catalog.get(it.key).checksum == changed.checksum
    assert node.nvme.used_bytes == BLOCK
    # A stale slot never removes the current copy.
    assert asyncio.run(node.mover.drop(first.moved)) == 0
    assert node.catalog.get(it.key) is not None and node.nvme.used_bytes == BLOCK
    assert asyncio.run(node.mover.drop(second.moved)) == 1
    assert len(node.catalog) == 0 and node.nvme.used_bytes == 0
    with pytest.raises(ValueError):
        asyncio.run(node.mover.demote([it, it]))
