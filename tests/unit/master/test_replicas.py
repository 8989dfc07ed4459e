"""Replica bookkeeping on the master's index, and the node-change journal (RemoteNode).

The nodes are the master's mirrors of nodes in other processes; nothing here moves bytes.
"""

from __future__ import annotations

import os

from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.identity import Namespace
from tests.unit.master.test_placement import BLOCK, LAYOUT, remote


def setup():
    a, b = remote(1, "host-a", 8), remote(2, "host-b", 8)
    nodes = NodeRegistry()
    nodes.add(a)
    nodes.add(b)
    index = BlockIndex(nodes, IndexConfig(eviction_policy="lru"))
    ns = Namespace("m", LAYOUT)
    index.register_namespace(ns)
    return index, a, b, ns.id


def commit(index, ns, host="host-a", n=2):
    keys = [os.urandom(16) for _ in range(n)]
    grant, _ = index.put_start(ns, keys, [BLOCK] * n, client_host=host)
    index.put_commit(grant.put_id, None, [7] * n)
    return [index.entry(k) for k in keys]


def test_a_replica_goes_with_its_entry():
    index, a, b, ns = setup()
    entries = commit(index, ns)
    for e in entries:
        assert index.add_replica(e, b.node_id, "dram", b.allocate("dram", BLOCK))
    assert b.usage()[0].used_slots == 2
    index.remove([entries[0].key])
    assert b.usage()[0].used_slots == 1               # its replica was freed with it
    index.evict(None)                                 # the memory copy goes: so does the replica
    assert b.usage()[0].used_slots == 0 and index.block_count == 0


def test_a_dead_nodes_blocks_are_served_from_replicas():
    index, a, b, ns = setup()
    kept, lost = commit(index, ns), commit(index, ns)
    for e in kept:
        index.add_replica(e, b.node_id, "dram", b.allocate("dram", BLOCK))
    index.forget_node(a.node_id)
    assert {index.entry(e.key) is not None for e in lost} == {False}
    for e in kept:
        assert index.entry(e.key).node_id == b.node_id and index.entry(e.key).replicas == []
    assert index.lookup(ns, [e.key for e in kept], lease=False)[0] == 2


def test_the_journal_is_resent_until_applied():
    index, a, b, ns = setup()
    commit(index, ns, n=3)
    changes, seq, more = a.changes()
    assert [len(c.key) for c in changes] == [16, 16, 16] and seq == 3 and not more
    a.applied(2)
    changes, seq, _ = a.changes()
    assert len(changes) == 1 and seq == 3 and a.unapplied_changes == 1
    a.applied(3)
    assert a.changes()[0] == [] and a.unapplied_changes == 0


def test_the_namespace_setting_decides_which_blocks_are_queued_for_copies():
    from kvpool.master.replication import Replicator

    index, a, b, ns = setup()
    index.config.replicas = 2                          # the pool default (kvpool master --replicas 2)
    single = Namespace("single", LAYOUT)
    index.register_namespace(single, replicas=1)
    replicator = Replicator(index)
    commit(index, ns, n=2)
    commit(index, single.id, n=3)
    assert replicator.backlog == 2 and {e.ns for e in replicator._queue.values()} == {ns}
    index.config.replicas = 1
    index.set_replicas(single.id, 2)                   # raised: the blocks it has are queued too
    assert replicator.backlog == 5
    assert (index.replicas_of(ns), index.replicas_of(single.id)) == (1, 2)
    assert index.register_namespace(single).replicas == 2   # registering again keeps the setting


def test_lowering_replicas_frees_copies_but_never_a_leased_one():
    index, a, b, ns = setup()
    index.set_replicas(ns, 2)
    free, leased = commit(index, ns)
    for e in (free, leased):
        assert index.add_replica(e, b.node_id, "dram", b.allocate("dram", BLOCK))
    _, lease = index.get(ns, [leased.key])             # a reader may be reading the copy on b
    index.set_replicas(ns, 1)
    assert free.replicas == [] and len(leased.replicas) == 1
    assert b.usage()[0].used_slots == 1
    index.evict(None)                                  # the leased block, and so its copy, stays
    assert b.usage()[0].used_slots == 1 and index.entry(leased.key) is leased
    index.release([lease.lease_id])
    index.evict(None)
    assert b.usage()[0].used_slots == 0 and index.block_count == 0


def replicated(index, ns, b, n=2):
    entries = commit(index, ns, n=n)
    for e in entries:
        assert index.add_replica(e, b.node_id, "dram", b.allocate("dram", BLOCK))
    return entries


def test_each_copy_is_evicted_by_its_own_nodes_policy():
    index, a, b, ns = setup()
    entries = replicated(index, ns, b)
    assert index.evict_from(b.node_id, "dram", None) == (2, 2 * BLOCK)   # node B's copies only
    assert b.usage()[0].used_slots == 0 and a.usage()[0].used_slots == 2
    assert all(index.entry(e.key).node_id == a.node_id and e.replicas == [] for e in entries)
    assert index.lookup(ns, [e.key for e in entries], lease=False)[0] == 2


def test_a_block_whose_node_evicts_it_lives_on_in_its_replica():
    index, a, b, ns = setup()
    entries = replicated(index, ns, b)
    index.evict_from(a.node_id, "dram", None)
    assert a.usage()[0].used_slots == 0 and b.usage()[0].used_slots == 2
    for e in entries:                                  # served from node B now, bytes where they were
        assert index.entry(e.key).node_id == b.node_id and e.mem_tier == "dram" and e.replicas == []
    assert index.tier_blocks(b.node_id, "dram") == 2 and index.tier_blocks(a.node_id, "dram") == 0
    index.evict_from(b.node_id, "dram", None)          # the last copy: the block is gone
    assert index.block_count == 0 and b.usage()[0].used_slots == 0


def test_demoting_the_entrys_copy_keeps_its_replicas():
    from kvpool.tiers.base import Slot

    index, a, b, ns = setup()
    (e,) = replicated(index, ns, b, n=1)
    index.pin(e)                                       # the mover's pin
    index.demoted(e, Slot(0, BLOCK))                   # node A's DRAM copy went to its NVMe
    index.unpin(e)
    # Both copies stay; the one in memory (node B's) is the one a read now goes to.
    on_a, on_b = e.copy_on(a.node_id), e.copy_on(b.node_id)
    assert on_a.mem is None and on_a.nvme is not None and on_b.mem is not None
    assert e.copies[0] is on_b and e.node_id == b.node_id and e.tier == "dram"
    assert a.usage()[0].used_slots == 0 and b.usage()[0].used_slots == 1


def test_a_leased_replica_is_not_evicted():
    index, a, b, ns = setup()
    entries = replicated(index, ns, b)
    _, lease = index.lookup(ns, [entries[0].key])
    assert index.evict_from(b.node_id, "dram", None)[0] == 1       # only the unleased one's copy
    assert len(entries[0].replicas) == 1 and entries[1].replicas == []
    index.release([lease.lease_id])


def test_read_driven_copies_are_bounded_and_go_to_the_readers_host():
    from kvpool.master.replication import READ_COPY_AFTER, Replicator

    index, a, b, ns = setup()
    index.config.read_replicas = 1
    replicator = Replicator(index)
    entries = commit(index, ns)                        # on node A (host-a)
    for _ in range(READ_COPY_AFTER - 1):
        replicator.read(entries, "host-b")
        replicator.read(entries, "host-a")             # local reads are not counted
    assert replicator.backlog == 0
    replicator.read(entries, "host-b")
    assert replicator.backlog == 2 and {h for _, h in replicator._to_host.values()} == {"host-b"}
    replicator._to_host.clear()
    for e in entries:                                  # one extra copy already: the bound is reached
        index.add_replica(e, b.node_id, "dram", b.allocate("dram", BLOCK))
    for _ in range(READ_COPY_AFTER):
        replicator.read(entries, "host-c")
    assert replicator.backlog == 0


def reported(node, keys, ns, checksum=7):
    """What ``node`` reports holding in memory when it registers again (slots claimed)."""
    return [(k, node.allocate("dram", BLOCK), checksum, ns, "dram") for k in keys]


def test_copies_reported_after_a_master_restart_are_adopted_back_as_copies():
    from kvpool.tiers.base import Slot

    index, a, b, ns = setup()
    index.set_replicas(ns, 2)
    same_host_as_a, third_host = remote(3, "host-a", 8), remote(4, "host-c", 8)
    index.nodes.add(same_host_as_a)
    index.nodes.add(third_host)
    keys = [os.urandom(16) for _ in range(3)]
    assert index.adopt_memory(a.node_id, reported(a, keys, ns)) == 3
    assert index.adopt_memory(b.node_id, reported(b, keys, ns)) == 3          # one more copy of each
    assert index.adopt_memory(same_host_as_a.node_id, reported(same_host_as_a, keys[:1], ns)) == 0  # a host: one
    assert index.adopt_memory(third_host.node_id, reported(third_host, keys[:1], ns)) == 0  # replicas=2 reached
    assert same_host_as_a.usage()[0].used_slots == third_host.usage()[0].used_slots == 0      # extras freed
    for k in keys:
        assert [c.node_id for c in index.entry(k).copies] == [a.node_id, b.node_id]
    assert index.tier_blocks(b.node_id, "dram") == 3 and index.counters.replicated_blocks == 0
    # An NVMe copy a node found on its disk joins too; one with other bytes is dropped there.
    other = os.urandom(16)
    index.adopt_memory(a.node_id, reported(a, [other], ns))
    assert index.adopt(b.node_id, [(other, Slot(0, BLOCK), 7, ns)]) == 1
    assert index.adopt(third_host.node_id, [(keys[1], Slot(0, BLOCK), 8, ns)]) == 0
    assert index.entry(other).copy_on(b.node_id).nvme == Slot(0, BLOCK)
    assert index.nvme_drops == {third_host.node_id: [(keys[1], Slot(0, BLOCK))]}
    index.forget_node(a.node_id)                       # the first node dies: the copies on B are read
    assert index.lookup(ns, keys, lease=False)[0] == 3
    assert all(index.entry(k).node_id == b.node_id for k in keys + [other])


def test_copies_adopted_before_their_namespace_is_registered_are_trimmed_to_its_setting():
    index, a, b, ns = setup()
    c = remote(3, "host-c", 8)
    index.nodes.add(c)
    fresh = BlockIndex(index.nodes, IndexConfig(eviction_policy="lru"))   # a restarted master
    keys = [os.urandom(16) for _ in range(2)]
    for node in (a, b, c):                             # the setting is not known yet: all are kept
        assert fresh.adopt_memory(node.node_id, reported(node, keys, ns)) == 2
    assert all(len(fresh.entry(k).copies) == 3 for k in keys)
    fresh.register_namespace(Namespace("m", LAYOUT), replicas=2)   # the client registers it again
    assert all(len(fresh.entry(k).copies) == 2 for k in keys)
    assert c.usage()[0].used_slots == 0 and a.usage()[0].used_slots == b.usage()[0].used_slots == 2


def test_blocks_that_lose_a_copy_with_a_dead_node_are_queued_for_a_new_one():
    from kvpool.master.replication import Replicator

    index, a, b, ns = setup()
    index.set_replicas(ns, 2)
    replicator = Replicator(index)
    entries = replicated(index, ns, b, n=3)
    replicator._queue.clear()                          # each has its two copies
    index.forget_node(b.node_id)                       # the node of the replicas dies
    assert replicator.backlog == 3 and all(len(e.copies) == 1 for e in entries)
