"""The node's record of its committed memory blocks (kvpool.node.resident)."""

from __future__ import annotations

import numpy as np
import xxhash

from kvpool.node.resident import ResidentBlock, ResidentMap


def block(arena, tier, offset, size, key):
    return ResidentBlock(tier, offset, size, key, xxhash.xxh3_64_intdigest(arena[offset:offset + size]), "ns")


def test_changes_apply_in_order_and_a_freed_slot_is_forgotten():
    arena = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    m = ResidentMap()
    a, b = block(arena, "dram", 0, 1024, b"a" * 16), block(arena, "dram", 1024, 1024, b"b" * 16)
    freed_a = ResidentBlock("dram", 0, 1024, b"", 0, "")
    m.apply([a, b, freed_a], seq=3)
    assert m.applied_seq == 3 and [x.key for x in m.blocks()] == [b"b" * 16]
    m.apply([a], seq=2)                      # a resend of an older batch never lowers the count
    assert m.applied_seq == 3
    m.reset_seq()
    assert m.applied_seq == 0


def test_a_slot_whose_bytes_changed_is_not_reported():
    arena = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    m = ResidentMap()
    kept, overwritten = block(arena, "dram", 0, 1024, b"k" * 16), block(arena, "dram", 2048, 1024, b"o" * 16)
    m.apply([kept, overwritten], seq=2)
    arena[2048 + 5] ^= 0xFF                  # a later writer reused the slot; the free never arrived
    assert [b.key for b in m.verified({"dram": arena})] == [b"k" * 16]
    assert len(m) == 1
    assert m.holds(kept, {"dram": arena}) and not m.holds(overwritten, {"dram": arena})


def test_an_older_answer_arriving_after_a_newer_one_does_not_bring_a_freed_slot_back():
    arena = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)
    m = ResidentMap()
    a, b = block(arena, "dram", 0, 1024, b"a" * 16), block(arena, "dram", 1024, 1024, b"b" * 16)
    freed_a = ResidentBlock("dram", 0, 1024, b"", 0, "")
    m.apply([a, b, freed_a], seq=3)          # ApplyChanges: everything up to the removal of a
    m.apply([a, b], seq=2)                   # the heartbeat answer sent before it, late
    assert [x.key for x in m.blocks()] == [b"b" * 16]
    c = block(arena, "dram", 2048, 1024, b"c" * 16)
    m.apply([b, freed_a, c], seq=4)          # overlapping: only the new change (4) applies
    assert sorted(x.key for x in m.blocks()) == [b"b" * 16, b"c" * 16] and m.applied_seq == 4
