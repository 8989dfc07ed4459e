"""BlockIndex invariants against a real node (DRAM arena) and a controllable clock."""

from __future__ import annotations

import os

import pytest

from kvpool.errors import FailedPrecondition, InvalidArgument, NotFound, PoolFull
from kvpool.identity import Namespace
from kvpool.layout import KVLayout
from kvpool.master.index import PUT_GRANTED, PUT_IN_FLIGHT, PUT_PRESENT, BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.node.node import Node

LAYOUT = KVLayout(1, 1, 64, "float16", 16)  # 4 KiB blocks
BLOCK = LAYOUT.block_bytes


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def env():
    node = Node.with_dram(1, "n1", 16 * BLOCK, chunk_bytes=16 * BLOCK, prefault=False)
    nodes = NodeRegistry()
    nodes.add(node)
    clock = Clock()
    index = BlockIndex(nodes, IndexConfig(grant_ttl_s=5, lease_ttl_s=10, high_watermark=1.0, low_watermark=1.0, eviction_policy="lru"), clock)
    ns = Namespace("m", LAYOUT)
    index.register_namespace(ns)
    yield index, node, clock, ns.id
    node.close()


def keys(n):
    return [os.urandom(16) for _ in range(n)]


def put(index, ns, ks):
    grant, statuses = index.put_start(ns, ks, [BLOCK] * len(ks))
    index.put_commit(grant.put_id, None, [0] * len(grant.entries))
    return statuses


def test_two_phase_put_and_dedup(env):
    index, node, _, ns = env
    ks = keys(3)
    grant, statuses = index.put_start(ns, ks, [BLOCK] * 3)
    assert statuses == [PUT_GRANTED] * 3
    assert index.lookup(ns, ks)[0] == 0                      # invisible until commit
    _, again = index.put_start(ns, ks + ks[:1], [BLOCK] * 4)
    assert again == [PUT_IN_FLIGHT] * 4
    index.put_commit(grant.put_id, None, [1, 2, 3])
    assert index.lookup(ns, ks)[0] == 3
    _, statuses = index.put_start(ns, ks, [BLOCK] * 3)
    assert statuses == [PUT_PRESENT] * 3
    assert index.counters.dedup_blocks == 3


def test_duplicate_keys_in_one_batch_are_granted_once(env):
    index, node, _, ns = env
    k = keys(1)
    grant, statuses = index.put_start(ns, k * 3, [BLOCK] * 3)
    assert statuses == [PUT_GRANTED, PUT_IN_FLIGHT, PUT_IN_FLIGHT]
    assert node.tiers["dram"].used_bytes == BLOCK


def test_grant_expiry_frees_slots(env):
    index, node, clock, ns = env
    grant, _ = index.put_start(ns, keys(2), [BLOCK] * 2)
    clock.t += 6
    assert index.expire() == (1, 0)
    assert node.tiers["dram"].used_bytes == 0
    with pytest.raises(NotFound, match="expired"):
        index.put_commit(grant.put_id, None, [0, 0])


def test_lease_pins_against_eviction_remove_and_expiry(env):
    index, node, clock, ns = env
    ks = keys(4)
    put(index, ns, ks)
    hits, lease = index.lookup(ns, ks[:2])
    assert hits == 2
    assert index.evict(None)[:2] == (2, 2 * BLOCK)           # only the unleased two
    assert index.remove(ks[:2]) == (0, 2)                    # deferred
    assert index.lookup(ns, ks[:1])[0] == 0
    assert node.tiers["dram"].used_bytes == 2 * BLOCK
    clock.t += 11
    assert index.expire() == (0, 1)                          # forgotten lease expires
    assert node.tiers["dram"].used_bytes == 0


def test_two_leases_on_one_block(env):
    index, node, _, ns = env
    k = keys(1)
    put(index, ns, k)
    _, l1 = index.lookup(ns, k)
    _, l2 = index.get(ns, k)
    index.remove(k)
    index.release([l1.lease_id])
    assert node.tiers["dram"].used_bytes == BLOCK            # still pinned by l2
    assert index.release([l2.lease_id, l2.lease_id]) == (1, 0)  # idempotent
    assert node.tiers["dram"].used_bytes == 0


def test_full_pool_evicts_lru_order(env):
    index, node, clock, ns = env
    old, new = keys(8), keys(8)
    put(index, ns, old)
    put(index, ns, new)
    _, lease = index.lookup(ns, old[:1])                     # a read makes old[0] recent
    index.release([lease.lease_id])
    fresh = keys(2)
    put(index, ns, fresh)
    assert index.lookup(ns, old[:1])[0] == 1                 # recently read: kept
    assert index.lookup(ns, old[1:2])[0] == 0                # least recent: evicted
    assert index.lookup(ns, old[2:3])[0] == 0
    assert index.lookup(ns, fresh)[0] == 2


def test_pool_full_when_nothing_evictable_is_all_or_nothing(env):
    index, node, _, ns = env
    ks = keys(16)
    put(index, ns, ks)
    _, lease = index.lookup(ns, ks)
    with pytest.raises(PoolFull, match="nothing more is evictable"):
        index.put_start(ns, keys(1), [BLOCK])
    assert index.pending_count == 0 and index.lookup(ns, ks)[0] == 16


def test_validation_errors(env):
    index, _, _, ns = env
    with pytest.raises(InvalidArgument, match="blocks of 4096 bytes"):
        index.put_start(ns, keys(1), [BLOCK + 1])
    with pytest.raises(NotFound, match="RegisterNamespace"):
        index.lookup("nope", keys(1))
    with pytest.raises(InvalidArgument, match="empty"):
        index.get(ns, [])
    with pytest.raises(InvalidArgument, match="multiple of 16"):
        index.split_packed(b"x" * 17, "Lookup")
    grant, _ = index.put_start(ns, keys(1), [BLOCK])
    with pytest.raises(FailedPrecondition):
        index.put_commit(grant.put_id, keys(1), [0])


def test_abort_all_on_shutdown(env):
    index, node, _, ns = env
    index.put_start(ns, keys(3), [BLOCK] * 3)
    index.put_start(ns, keys(2), [BLOCK] * 2)
    assert index.abort_all() == 5
    assert node.tiers["dram"].used_bytes == 0
