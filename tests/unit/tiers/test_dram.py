from __future__ import annotations

import os

import numpy as np
import pytest

from kvpool.tiers.base import TierCaps
from kvpool.tiers.dram import DramArena, map_shared_arena


def test_client_mapping_sees_node_writes_and_vice_versa():
    arena = DramArena(4 << 20, chunk_bytes=1 << 20)
    try:
        assert TierCaps.HOST_SHARED in arena.caps and TierCaps.ADDRESSABLE in arena.caps
        slot = arena.allocate(4096)
        arena.write(slot, b"\x07" * 4096)
        seg = map_shared_arena(arena.describe()["shm_name"], arena.capacity)
        assert bytes(seg.array[slot.offset : slot.offset + 4]) == b"\x07" * 4
        seg.array[slot.offset : slot.offset + 4096] = 9
        out = bytearray(4096)
        arena.read_into(slot, out)
        assert out == b"\x09" * 4096
        seg.close()
    finally:
        arena.close()
    assert not os.path.exists(arena.segment.path)


def test_write_size_mismatch_raises():
    arena = DramArena(1 << 20)
    try:
        slot = arena.allocate(1024)
        with pytest.raises(ValueError):
            arena.write(slot, np.zeros(10, np.uint8))
    finally:
        arena.close()


def test_too_big_for_dev_shm_is_actionable():
    with pytest.raises(MemoryError, match="lower --dram"):
        DramArena(1 << 50, chunk_bytes=1 << 40)


def test_pin_without_cuda_is_a_no_op():
    arena = DramArena(1 << 20)
    try:
        pinned = arena.pin()
        assert pinned == (TierCaps.PINNED in arena.caps)
    finally:
        arena.close()
