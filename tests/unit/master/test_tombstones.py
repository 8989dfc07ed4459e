"""Tombstones of removed blocks (kvpool.master.tombstones) on the master's index and its
mirrors of nodes in other processes; nothing here moves bytes."""

from __future__ import annotations

import os

import pytest
from kvpool.tiers.base import Slot

from kvpool.identity import Namespace
from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.master.tombstones import Tombstone, Tombstones
from kvpool.rpc.v1 import node_pb2
from tests.unit.master.test_placement import BLOCK, LAYOUT, remote


class Store:
    """What the Redis metadata is told (kvpool.master.metastore.RedisMeta.tombstones)."""

    def __init__(self) -> None:
        self.fields: set[bytes] = set()

    def tombstones(self, put, drop) -> None:
        self.fields -= set(drop)
        self.fields |= set(put)


def setup():
    a, b = remote(1, "host-a", 8), remote(2, "host-b", 8)
    nodes = NodeRegistry()
    for n in (a, b):
        nodes.add(n)
    index = BlockIndex(nodes, IndexConfig(eviction_policy="lru"))
    tombs = Tombstones({1: a, 2: b}.get)
    tombs.store = Store()
    index.observers.append(tombs)
    ns = Namespace("m", LAYOUT)
    index.register_namespace(ns)
    return index, tombs, a, b, ns.id


def commit(index, ns, keys):
    grant, _ = index.put_start(ns, keys, [BLOCK] * len(keys), client_host="host-a")
    index.put_commit(grant.put_id, None, [7] * len(keys))
    return [index.entry(k) for k in keys]


def heartbeat(tombs, node) -> None:
    """One heartbeat, as RegistryServicer.Heartbeat handles it: the node says it applied
    what the previous answer carried; this answer carries every change journaled so far."""
    node.applied(getattr(node, "sent", 0))
    tombs.confirm(node)
    node.sent = node.changes()[1]


def report(entries):
    return [node_pb2.ResidentBlock(tier=e.mem_tier, offset=e.mem.offset, size=BLOCK, key=e.key, checksum=7)
            for e in entries]


def test_a_tombstone_per_copy_until_the_node_applied_the_free():
    index, tombs, a, b, ns = setup()
    e, kept = commit(index, ns, [os.urandom(16), os.urandom(16)])
    index.add_replica(e, b.node_id, "dram", b.allocate("dram", BLOCK))
    index.remove([e.key])
    assert {(t.node, t.key) for n in ("node-1", "node-2") for t in tombs.of(n)} == {("node-1", e.key), ("node-2", e.key)}
    assert len(tombs.store.fields) == 2
    heartbeat(tombs, a)                          # numbered now, sent, but not applied
    assert len(tombs.of("node-1")) == 1
    for node in (a, b, a, b):
        heartbeat(tombs, node)
    assert len(tombs) == 0 and tombs.store.fields == set()
    assert index.entry(kept.key) is not None


def test_a_leased_removal_keeps_its_tombstone_until_its_slot_is_freed():
    index, tombs, a, _, ns = setup()
    (e,) = commit(index, ns, [os.urandom(16)])
    _, lease = index.lookup(ns, [e.key])
    index.remove([e.key])
    heartbeat(tombs, a)
    heartbeat(tombs, a)
    assert len(tombs.of("node-1")) == 1          # the slot still holds the block: it is leased
    index.release([lease.lease_id])
    heartbeat(tombs, a)                          # freed now: numbered and sent ...
    assert len(tombs) == 1
    heartbeat(tombs, a)                          # ... and applied
    assert len(tombs) == 0


def test_the_same_key_committed_again_into_the_same_slot_ends_its_tombstone():
    index, tombs, _, _, ns = setup()
    key = os.urandom(16)
    (e,) = commit(index, ns, [key])
    slot = e.mem
    index.remove([key])
    (again,) = commit(index, ns, [key])
    assert again.mem == slot and len(tombs) == 0 and tombs.store.fields == set()


def test_a_registering_node_has_what_tombstones_name_freed_and_the_rest_adopted():
    index, tombs, a, _, ns = setup()
    gone, kept = commit(index, ns, [os.urandom(16)]), commit(index, ns, [os.urandom(16)])
    stale = Tombstone("node-1", "x", "dram", 7 * BLOCK, os.urandom(16), False)   # the node applied that one
    tombs.load([stale.field])
    reported = report(gone + kept)
    index.remove([gone[0].key])
    memory, _, dead_memory, _ = tombs.sift(a, reported, [])
    assert [b.key for b in memory] == [kept[0].key] and [b.key for b in dead_memory] == [gone[0].key]
    assert [t.key for t in tombs.of("node-1")] == [gone[0].key]                  # the stale one ended
    restarted = remote(1, "host-a", 8)
    restarted.incarnation = "y"                  # a new process: its memory is new
    assert tombs.sift(restarted, reported, [])[2] == [] and len(tombs) == 0


def test_an_nvme_tombstone_outlives_the_node_process_and_ends_with_the_drop():
    _, tombs, a, _, ns = setup()
    t = Tombstone("node-1", "old", "nvme", 3 * BLOCK, os.urandom(16), True)
    tombs.load([t.field])
    block = (t.key, Slot(t.offset, BLOCK), 7, ns)
    _, nvme, _, dead_nvme = tombs.sift(a, [], [block])
    assert (nvme, dead_nvme) == ([], [block])
    drops: dict = {}
    tombs.free_on(a, [], dead_nvme, drops)
    assert drops == {a.node_id: [(t.key, Slot(t.offset, BLOCK))]} and len(tombs) == 1
    tombs.nvme_dropped(a, drops[a.node_id])
    assert len(tombs) == 0


@pytest.mark.parametrize("key", [b"\0" * 16, b"k\0y" + bytes(13) + b"alice"])
def test_a_tombstone_field_names_it_whole(key):
    t = Tombstone("node-1", "inc", "dram", 123, key, False)
    assert Tombstone.from_field(t.field) == t
    with pytest.raises(ValueError):
        Tombstone.from_field(b"node-1\0inc\0dram\0notanumber\0m\0" + key)
