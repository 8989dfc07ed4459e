"""NvmeArena on real files: round trips, direct/buffered choice, restart, claim, disk limits."""

from __future__ import annotations

import errno
import logging
import mmap
import os

import numpy as np
import pytest

from kvpool.tiers.base import SlabAllocator, Slot, TierCaps
from kvpool.tiers.nvme import DIRECT_ALIGN, SLOT_FILE, NvmeArena, _advance

MiB = 1 << 20


def aligned_buffer(size: int, seed: int = 0) -> memoryview:
    """Random bytes in page-aligned memory (an anonymous mmap), as DRAM slots are."""
    m = mmap.mmap(-1, size)
    np.frombuffer(m, dtype=np.uint8)[:] = np.random.default_rng(seed).integers(
        0, 256, size, dtype=np.uint8)
    return memoryview(m)


def test_caps_and_file_layout(tmp_path):
    arena = NvmeArena(str(tmp_path), 8 * MiB, chunk_bytes=4 * MiB)
    try:
        assert arena.name == "nvme"
        assert arena.caps == TierCaps.PERSISTENT | TierCaps.BLOCKING_IO
        assert arena.path == os.path.join(str(tmp_path), SLOT_FILE)
        st = os.stat(arena.path)
        assert st.st_size == 8 * MiB
        assert st.st_blocks * 512 >= 8 * MiB  # preallocated, not sparse
    finally:
        arena.close()


def test_round_trip_aligned_blocks(tmp_path):
    arena = NvmeArena(str(tmp_path), 16 * MiB, chunk_bytes=4 * MiB)
    try:
        slots = [arena.allocate(MiB) for _ in range(5)]
        assert all(s.offset % DIRECT_ALIGN == 0 for s in slots)
        data = [aligned_buffer(MiB, seed=i) for i in range(5)]
        for s, d in zip(slots, data):
            assert arena.is_direct(s.offset, [d]) == arena.direct
            arena.write(s, d)
        arena.sync()
        for s, d in zip(slots, data):
            out = aligned_buffer(MiB, seed=99)
            arena.read_into(s, out)
            assert bytes(out) == bytes(d)
    finally:
        arena.close()


def test_vectored_run_spans_slots(tmp_path):
    arena = NvmeArena(str(tmp_path), 8 * MiB, chunk_bytes=4 * MiB)
    try:
        a, b, c = (arena.allocate(256 << 10) for _ in range(3))
        assert b.offset == a.offset + a.size and c.offset == b.offset + b.size
        bufs = [aligned_buffer(256 << 10, seed=i) for i in range(3)]
        arena.write_vectored(a.offset, bufs)
        for s, d in zip((a, b, c), bufs):
            out = bytearray(s.size)
            arena.read_into(s, out)
            assert out == bytes(d)
        outs = [aligned_buffer(256 << 10, seed=7) for _ in range(3)]
        arena.read_vectored(a.offset, outs)
        assert [bytes(o) for o in outs] == [bytes(d) for d in bufs]
    finally:
        arena.close()


def test_unaligned_sizes_and_buffers_go_buffered(tmp_path):
    arena = NvmeArena(str(tmp_path), 4 * MiB, chunk_bytes=MiB)
    try:
        s1, s2 = arena.allocate(1000), arena.allocate(1000)
        assert s2.offset == 1000
        assert not arena.is_direct(s2.offset, [bytes(1000)])
        aligned = aligned_buffer(2 * DIRECT_ALIGN)
        assert not arena.is_direct(0, [aligned[1 : 1 + DIRECT_ALIGN]])  # misaligned address
        arena.write(s1, b"a" * 1000)
        arena.write(s2, bytes(range(256)) * 3 + b"z" * 232)  # read-only source buffers
        out = bytearray(1000)
        arena.read_into(s2, out)
        assert out == bytes(range(256)) * 3 + b"z" * 232
        arena.read_into(s1, out)
        assert out == b"a" * 1000
    finally:
        arena.close()


def test_size_and_range_checks(tmp_path):
    arena = NvmeArena(str(tmp_path), 4 * MiB, chunk_bytes=MiB)
    try:
        s = arena.allocate(8192)
        with pytest.raises(ValueError):
            arena.write(s, bytes(4096))
        with pytest.raises(ValueError):
            arena.read_into(s, bytearray(100))
        with pytest.raises(ValueError):
            arena.write_vectored(arena.capacity - 4096, [bytes(8192)])
        with pytest.raises(ValueError):
            NvmeArena(str(tmp_path / "x"), 4 * MiB, chunk_bytes=1000)
    finally:
        arena.close()


def test_restart_keeps_bytes_and_claims(tmp_path):
    arena = NvmeArena(str(tmp_path), 16 * MiB, chunk_bytes=4 * MiB)
    slots = [arena.allocate(MiB) for _ in range(6)]
    keep = [slots[1], slots[4]]
    data = {s: aligned_buffer(MiB, seed=s.offset) for s in keep}
    for s, d in data.items():
        arena.write(s, d)
    arena.sync()
    arena.close()

    # Restart, asking for another chunk size: the recorded geometry wins.
    again = NvmeArena(str(tmp_path), 16 * MiB, chunk_bytes=8 * MiB)
    try:
        assert again.slots.chunk_bytes == 4 * MiB
        for s in keep:
            again.slots.claim(s)
        assert again.used_bytes == 2 * MiB
        for s, d in data.items():
            out = aligned_buffer(MiB, seed=1)
            again.read_into(s, out)
            assert bytes(out) == bytes(d)
        fresh = {again.allocate(MiB) for _ in range(14)}
        assert not fresh & set(keep)  # claimed slots are never handed out again
        assert again.allocate(MiB) is None
    finally:
        again.close()


def test_claim_rules():
    a = SlabAllocator(4 * MiB, chunk_bytes=MiB)
    a.claim(Slot(MiB + 2 * 4096, 4096))
    assert a.used_slots == 1 and a.used_bytes == 4096
    with pytest.raises(RuntimeError):
        a.claim(Slot(MiB + 2 * 4096, 4096))  # already allocated
    with pytest.raises(RuntimeError):
        a.claim(Slot(MiB, 8192))  # chunk bound to 4096-byte blocks
    with pytest.raises(ValueError):
        a.claim(Slot(4 * MiB, 4096))  # out of bounds
    with pytest.raises(ValueError):
        a.claim(Slot(-4096, 4096))
    with pytest.raises(ValueError):
        a.claim(Slot(3 * MiB + 100, 4096))  # off the grid
    with pytest.raises(ValueError):
        a.claim(Slot(2 * MiB + 900000, 300000))  # a chunk holds 3 of them; no 4th
    with pytest.raises(ValueError):
        a.claim(Slot(0, 2 * MiB))  # larger than a chunk
    # The claimed slot is freeable and reusable; allocation skips it while it is held.
    got = {a.allocate(4096).offset for _ in range(256)}
    assert MiB + 2 * 4096 not in got and len(got) == 256
    a.free(Slot(MiB + 2 * 4096, 4096))
    assert not a.is_allocated(Slot(MiB + 2 * 4096, 4096))


def test_claim_many_then_allocate_rest():
    a = SlabAllocator(64 * MiB, chunk_bytes=4 * MiB)
    claimed = [Slot(o, MiB) for o in range(0, 64 * MiB, 3 * MiB)]
    for s in reversed(claimed):
        a.claim(s)
    rest = []
    while (s := a.allocate(MiB)) is not None:
        rest.append(s)
    assert len(claimed) + len(rest) == 64
    assert not {s.offset for s in rest} & {s.offset for s in claimed}
    for s in claimed + rest:
        a.free(s)
    assert a.used_bytes == 0 and a.free_slots_for(MiB) == 64


def test_advance_after_short_transfer():
    bufs = [memoryview(b"abcd"), memoryview(b"efgh"), memoryview(b"ij")]
    assert [bytes(b) for b in _advance(bufs, 0)] == [b"abcd", b"efgh", b"ij"]
    assert [bytes(b) for b in _advance(bufs, 5)] == [b"fgh", b"ij"]
    assert [bytes(b) for b in _advance(bufs, 8)] == [b"ij"]
    assert _advance(bufs, 10) == []


def test_buffered_when_configured(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kvpool.tiers.nvme"):
        arena = NvmeArena(str(tmp_path), 4 * MiB, chunk_bytes=MiB, direct=False)
    try:
        assert not arena.direct
        assert not arena.is_direct(0, [aligned_buffer(4096)])
        lines = [r for r in caplog.records if r.name == "kvpool.tiers.nvme"]
        assert len(lines) == 1 and "buffered" in lines[0].getMessage()
        s = arena.allocate(8192)
        d = aligned_buffer(8192, seed=3)
        arena.write(s, d)
        out = bytearray(8192)
        arena.read_into(s, out)
        assert out == bytes(d)
    finally:
        arena.close()


def test_falls_back_when_filesystem_refuses_o_direct(mount_point, caplog):
    path = mount_point("ramfs")  # ramfs has no direct I/O: open(O_DIRECT) gives EINVAL
    with caplog.at_level(logging.INFO, logger="kvpool.tiers.nvme"):
        arena = NvmeArena(path, 4 * MiB, chunk_bytes=MiB)
    try:
        assert not arena.direct and "O_DIRECT" in arena.direct_reason
        lines = [r for r in caplog.records if r.name == "kvpool.tiers.nvme"]
        assert len(lines) == 1 and "falling back to buffered" in lines[0].getMessage()
        s = arena.allocate(MiB)
        d = aligned_buffer(MiB, seed=5)
        arena.write(s, d)
        arena.sync()
        out = aligned_buffer(MiB, seed=6)
        arena.read_into(s, out)
        assert bytes(out) == bytes(d)
    finally:
        arena.close()
    with pytest.raises(OSError):
        NvmeArena(path, 4 * MiB, chunk_bytes=MiB, direct=True)


def test_preallocation_that_does_not_fit_fails_cleanly(mount_point):
    path = mount_point("tmpfs", "size=4m")
    with pytest.raises(OSError) as info:
        NvmeArena(path, 16 * MiB, chunk_bytes=MiB)
    assert info.value.errno == errno.ENOSPC and "--nvme" in str(info.value)
    assert not os.path.exists(os.path.join(path, SLOT_FILE))


def test_sparse_arena_reports_enospc_on_write(mount_point):
    path = mount_point("tmpfs", "size=4m")
    arena = NvmeArena(path, 16 * MiB, chunk_bytes=MiB, preallocate=False)
    try:
        slots = [arena.allocate(MiB) for _ in range(8)]
        with pytest.raises(OSError) as info:
            for s in slots:
                arena.write(s, aligned_buffer(MiB))
        assert info.value.errno == errno.ENOSPC
    finally:
        arena.close()
