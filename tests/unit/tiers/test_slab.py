from __future__ import annotations

import random

import pytest

from kvpool.tiers.base import SlabAllocator, Slot


def test_one_slab_per_size_and_no_overlap():
    a = SlabAllocator(4 << 20, chunk_bytes=1 << 20)
    big = [a.allocate(256 << 10) for _ in range(4)]      # fills one chunk
    small = [a.allocate(4096) for _ in range(300)]       # two chunks of 4 KiB slots
    spans = sorted((s.offset, s.offset + s.size) for s in big + small)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))
    assert a.used_bytes == 4 * (256 << 10) + 300 * 4096
    assert {s.offset // (1 << 20) for s in big}.isdisjoint({s.offset // (1 << 20) for s in small})


def test_full_then_free_then_reuse():
    a = SlabAllocator(1 << 20, chunk_bytes=1 << 20)
    slots = [a.allocate(64 << 10) for _ in range(16)]
    assert a.allocate(64 << 10) is None
    assert a.free_slots_for(64 << 10) == 0
    a.free(slots[3])
    assert a.allocate(64 << 10) == slots[3]


def test_empty_chunk_returns_to_the_pool():
    a = SlabAllocator(2 << 20, chunk_bytes=1 << 20)
    xs = [a.allocate(512 << 10) for _ in range(4)]          # both chunks bound to 512 KiB
    assert a.allocate(4096) is None
    for s in xs:
        a.free(s)
    # One empty chunk stays warm for 512 KiB, the other is free for another size.
    assert a.allocate(4096) is not None
    assert a.used_bytes == 4096


def test_double_free_and_bad_sizes_raise():
    a = SlabAllocator(1 << 20, chunk_bytes=1 << 20)
    s = a.allocate(1024)
    a.free(s)
    with pytest.raises(RuntimeError):
        a.free(s)
    with pytest.raises(RuntimeError):
        a.free(Slot(12345, 1024))
    with pytest.raises(ValueError):
        a.allocate(2 << 20)
    with pytest.raises(ValueError):
        a.allocate(0)


def test_random_churn_keeps_accounting():
    rng = random.Random(7)
    a = SlabAllocator(8 << 20, chunk_bytes=1 << 20)
    live: list[Slot] = []
    for _ in range(5000):
        if live and rng.random() < 0.5:
            a.free(live.pop(rng.randrange(len(live))))
        else:
            s = a.allocate(rng.choice([4096, 65536, 262144]))
            if s is not None:
                live.append(s)
        assert a.used_bytes == sum(s.size for s in live)
    spans = sorted((s.offset, s.offset + s.size) for s in live)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))
