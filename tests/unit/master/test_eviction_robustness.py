"""The default policy against the classic policies on traces where each classic one is known
to win, an adversarial scan, and leases. Small seeded traces (kvpool.tracegen), replayed
through the master's real index; each test takes a second or two."""

from __future__ import annotations

import os

import pytest

from kvpool import tracegen
from kvpool.errors import PoolFull
from kvpool.identity import Namespace
from kvpool.layout import KVLayout
from kvpool.master.eviction import DEFAULT_POLICY
from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.node.node import Node
from kvpool.replay import replay

CLASSICS = ("lru", "fifo", "lfu", "mru")

# (trace, capacity in blocks, the classic policy that must win it: proof of its shape)
CASES = {
    "recency": (lambda: tracegen.recency(2000, seed=1), 60, "lru"),
    "one_hit_wonders": (lambda: tracegen.one_hit_wonders(3000, seed=1), 150, "lfu"),
    "loop": (lambda: tracegen.loop(330, rounds=30), 300, "mru"),  # 10% larger than the cache
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_within_5_percent_of_the_best_classic_policy(case):
    make, capacity, winner = CASES[case]
    trace = make()
    classic = {name: replay(trace, name, capacity).hit_rate for name in CLASSICS}
    assert max(classic, key=classic.get) == winner, classic
    ours = replay(trace, DEFAULT_POLICY, capacity).hit_rate
    assert ours >= 0.95 * classic[winner], (ours, classic)


def test_an_adversarial_scan_does_not_flush_the_hot_set():
    # 10 hot prompts of 4 blocks, round-robin, with 6 one-time prompts between two hot ones:
    # 240 new blocks pass between two uses of a hot prompt, four times the cache, so LRU
    # keeps none of them. Every hit is a hot hit (scan blocks are never seen twice).
    trace = tracegen.scan(3000, seed=1)
    capacity = 60
    hot_blocks = sum(len(r) for r in trace.requests[::7])
    assert replay(trace, "lru", capacity).hit_blocks == 0
    ours = replay(trace, DEFAULT_POLICY, capacity)
    assert ours.hit_blocks >= 0.85 * hot_blocks, (ours.hit_blocks, hot_blocks)


def test_leased_blocks_are_never_chosen():
    """A reader holds a chain leased while writers fill the pool many times over; the
    default policy, driven by the real index over a real DRAM arena, never takes it."""
    layout = KVLayout(1, 1, 64, "float16", 16)
    size = layout.block_bytes
    node = Node.with_dram(1, "n1", 16 * size, chunk_bytes=16 * size, prefault=False)
    try:
        nodes = NodeRegistry()
        nodes.add(node)
        index = BlockIndex(nodes, IndexConfig(high_watermark=1.0, low_watermark=1.0, eviction_policy=DEFAULT_POLICY))
        ns = Namespace("m", layout)
        index.register_namespace(ns)

        def publish(chain):
            grant, _ = index.put_start(ns.id, chain, [size] * len(chain), first_position=0)
            index.put_commit(grant.put_id, None, [0] * len(grant.entries))

        held = [os.urandom(16) for _ in range(4)]
        publish(held)
        hit, lease = index.lookup(ns.id, held)
        assert hit == 4
        for i in range(300):
            chain = [os.urandom(16) for _ in range(1 + i % 5)]
            publish(chain)
            if i % 3 == 0:  # reuse some, so the policy has something to learn
                index.release([index.lookup(ns.id, chain)[1].lease_id])
            assert index.lookup(ns.id, held, lease=False)[0] == 4
        with pytest.raises(PoolFull):  # 12 free slots at most: the leased 4 are not offered
            publish([os.urandom(16) for _ in range(13)])
        index.release([lease.lease_id])
        publish([os.urandom(16) for _ in range(13)])  # now they can go
    finally:
        node.close()
