"""BlockIndex invariants against a real node (DRAM arena) and a controllable clock."""

from __future__ import annotations

import os
import time

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


# ---------------------------------------------------------------------------- policy hooks


class Spy:
    """Wraps a real policy and records what the index tells it."""

    def __init__(self, inner):
        self.inner, self.inserted, self.accessed, self.removed = inner, [], [], []
        self.answer = None  # when set, select_victims returns it instead
        self.answers = []  # when not empty, select_victims returns the first (and drops it)
        self.verdicts = []  # per select_victims call: the predicate's verdict on each probe
        self.probe = []

    def insert(self, key, info):
        self.insert_many([key], [info])

    def insert_many(self, keys, infos):
        self.inserted.append(list(zip(keys, infos)))
        self.inner.insert_many(keys, infos)

    def access(self, key):
        self.access_many([key])

    def access_many(self, keys):
        self.accessed.append(list(keys))
        self.inner.access_many(keys)

    def remove(self, key):
        self.inner.remove(key)

    def remove_many(self, keys):
        self.removed.append(list(keys))
        self.inner.remove_many(keys)

    def select_victims(self, count, evictable):
        self.verdicts.append([evictable(k) for k in self.probe])
        if self.answers:
            return self.answers.pop(0)
        return list(self.answer) if self.answer is not None else self.inner.select_victims(count, evictable)

    def __len__(self):
        return len(self.inner)


def spied_index(capacity_blocks=4, policy="lhd", clock=None, **config):
    from kvpool.master.eviction import make_policy

    node = Node.with_dram(1, "n1", capacity_blocks * BLOCK, chunk_bytes=capacity_blocks * BLOCK, prefault=False)
    nodes = NodeRegistry()
    nodes.add(node)
    spies = []

    def factory(name):
        spies.append(Spy(make_policy(name)))
        return spies[-1]

    index = BlockIndex(nodes, IndexConfig(high_watermark=1.0, low_watermark=1.0, eviction_policy=policy, **config),
                       clock or time.monotonic, policy_factory=factory)
    ns = Namespace("m", LAYOUT)
    index.register_namespace(ns)
    return index, node, spies, ns.id


def test_commit_tells_the_policy_each_blocks_parent_and_the_chains_last_block():
    index, node, spies, ns = spied_index(8)
    try:
        a, b, c = keys(3)
        put(index, ns, [a])
        grant, statuses = index.put_start(ns, [a, b, c], [BLOCK] * 3, first_position=0)
        assert statuses == [PUT_PRESENT, PUT_GRANTED, PUT_GRANTED]
        index.put_commit(grant.put_id, None, [0, 0])
        (batch,) = spies[0].inserted[1:]
        assert [(k, i.position, i.parent, i.last) for k, i in batch] == [(b, 1, a, False), (c, 2, b, True)]
        # a was present and unpinned: the put touched it (one reference), in one batch.
        assert spies[0].accessed == [[a]]
    finally:
        node.close()


def test_a_put_does_not_touch_what_its_writer_holds_leased():
    """The reader's lease end reports the read; a touch at put time would count it twice."""
    index, node, spies, ns = spied_index(8)
    try:
        a, b = keys(2)
        put(index, ns, [a])
        hit, lease = index.lookup(ns, [a, b])
        assert hit == 1
        put(index, ns, [a, b])
        assert spies[0].accessed == []
        index.release([lease.lease_id])
        assert spies[0].accessed == [[a]]
    finally:
        node.close()


def test_the_index_never_evicts_a_leased_block_whatever_the_policy_answers():
    index, node, spies, ns = spied_index(2)
    try:
        a, b, c = keys(3)
        put(index, ns, [a, b])
        hit, lease = index.lookup(ns, [a])
        spies[0].answer = [a, a, os.urandom(16)]  # leased, twice, and a key it does not hold
        with pytest.raises(PoolFull):
            put(index, ns, [c])
        assert index.lookup(ns, [a], lease=False)[0] == 1
        spies[0].answer = [a, b]
        put(index, ns, [c])  # b is taken; a stays
        assert index.lookup(ns, [a], lease=False)[0] == 1
        assert index.lookup(ns, [b], lease=False)[0] == 0
        index.release([lease.lease_id])
    finally:
        node.close()


def test_a_refused_proposal_is_not_the_end_of_an_eviction():
    """A key the index refuses (leased here) is refused for the rest of the call, and the
    policy is asked again for the room still missing."""
    index, node, spies, ns = spied_index(2)
    try:
        a, b, c = keys(3)
        put(index, ns, [a, b])
        hit, lease = index.lookup(ns, [a])
        spies[0].answers = [[a], [a, b]]
        put(index, ns, [c])
        assert [index.lookup(ns, [k], lease=False)[0] for k in (a, b, c)] == [1, 0, 1]
        assert spies[0].answers == []  # asked twice: the second answer's a was skipped
        index.release([lease.lease_id])
    finally:
        node.close()


def test_the_predicate_a_policy_calls_follows_every_pin_and_unpin():
    """The policy's per-candidate predicate reads the index's pinned keys, not the entries:
    it must follow leases (released, shrunk, expired), the movers' pins, and a removed
    block that is still leased when its key is published again."""
    clock = Clock()
    index, node, spies, ns = spied_index(8, clock=clock, lease_ttl_s=10)
    try:
        a, b, c = keys(3)
        put(index, ns, [a, b, c])
        spy = spies[0]
        spy.probe = [a, b, c]
        spy.answer = []  # it proposes nothing: each question below evicts nothing

        def verdict():
            spy.verdicts.clear()
            assert index.victims(1, "dram", BLOCK) == []
            (verdicts,) = spy.verdicts
            return verdicts

        assert verdict() == [True, True, True]
        _, l1 = index.lookup(ns, [a, b])
        _, l2 = index.get(ns, [a])
        assert verdict() == [False, False, True]
        index.release([l1.lease_id])
        assert verdict() == [False, True, True]  # a is still leased by l2
        index.shrink_lease(l2, 0)
        assert verdict() == [True, True, True]
        _, l3 = index.lookup(ns, [c])
        clock.t += 11
        index.expire()
        assert verdict() == [True, True, True]
        entry = index.entry(b)
        index.pin(entry)  # as the tier mover and the replicator pin what they copy
        assert verdict() == [True, False, True]
        index.unpin(entry)
        assert verdict() == [True, True, True]
        # Removed while leased, then published again: the old entry's pin still refuses
        # the key (conservative) until its lease ends; the new block is then evictable.
        _, l4 = index.lookup(ns, [a])
        index.remove([a])
        put(index, ns, [a])
        assert verdict() == [False, True, True]
        index.release([l4.lease_id])
        assert verdict() == [True, True, True]
        assert index._pinned == {}
    finally:
        node.close()


def test_an_evictions_victims_reach_the_policy_in_one_batch_once_they_are_gone():
    """The index drops every victim, then tells the policy with one remove_many: what it
    hears is exactly what left, and the policy tracks the tier."""
    index, node, spies, ns = spied_index(4)
    try:
        first, second = keys(4), keys(3)
        put(index, ns, first)
        put(index, ns, second)  # 3 of the first chain's blocks must go
        (gone,) = spies[0].removed
        assert len(gone) == 3 and set(gone) <= set(first)
        assert [index.lookup(ns, [k])[0] for k in gone] == [0, 0, 0]
        assert len(spies[0].inner) == index.tier_blocks(1, "dram") == 4
    finally:
        node.close()

