"""Every copy of a block has its own tier chain (kvpool.master.index.Copy), over the real index
and real nodes: shared-memory DRAM and NVMe files, as ``kvpool node --nvme`` has them.

Two in-process nodes stand for nodes of two hosts (their endpoints name the host). The replica
is made the way a Pull leaves it (its bytes in a DRAM slot of the second node, recorded with
``add_replica``); tests/integration/test_replicas.py copies it node to node for real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import numpy as np
import pytest
import xxhash

from kvpool.identity import Namespace
from kvpool.layout import KVLayout
from kvpool.master.index import BlockIndex, Copy, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.master.tiering import Tiering
from kvpool.node.node import Node

LAYOUT = KVLayout(1, 1, 1024, "float16", 16)  # 64 KiB blocks
BLOCK = LAYOUT.block_bytes


def on_host(node: Node, host: str) -> Node:
    node._endpoint = dataclasses.replace(node.endpoint(), host_id=host)
    return node


@pytest.fixture
def env(tmp_path):
    a = on_host(Node.build(1, "a", dram_bytes=4 << 20, nvme_bytes=8 << 20, data_dir=str(tmp_path / "a"),
                           chunk_bytes=1 << 20, prefault=False), "host-a")
    b = on_host(Node.build(2, "b", dram_bytes=4 << 20, nvme_bytes=8 << 20, data_dir=str(tmp_path / "b"),
                           chunk_bytes=1 << 20, prefault=False), "host-b")
    nodes = NodeRegistry()
    nodes.add(a)
    nodes.add(b)
    index = BlockIndex(nodes, IndexConfig(eviction_policy="lru", replicas=2))
    ns = Namespace("m", LAYOUT)
    index.register_namespace(ns)
    yield index, a, b, Tiering(index), ns.id
    a.close()
    b.close()


def put_replicated(index, a, b, ns, n):
    """``n`` blocks written on node A (host a), each with a replica on node B."""
    keys = [os.urandom(16) for _ in range(n)]
    grant, _ = index.put_start(ns, keys, [BLOCK] * n, client_host="host-a")
    data, sums = {}, []
    for i, key in enumerate(keys):
        data[key] = np.random.default_rng(i).integers(0, 256, BLOCK, dtype=np.uint8)
        a.tiers["dram"].write(grant.entries[key].mem, data[key])
        sums.append(xxhash.xxh3_64_intdigest(data[key]))
    index.put_commit(grant.put_id, None, sums)
    for key in keys:
        slot = b.allocate("dram", BLOCK)
        b.tiers["dram"].write(slot, data[key])           # what NodeControl.Pull leaves there
        assert index.add_replica(index.entry(key), b.node_id, "dram", slot)
    return keys, data


def read(node, slot) -> bytes:
    out = bytearray(BLOCK)
    node.tiers["dram"].read_into(slot, out)
    return bytes(out)


def test_every_copy_is_one_kind_of_record_counted_once_for_quotas(env):
    index, a, b, _, ns = env
    keys, _ = put_replicated(index, a, b, ns, 3)
    for key in keys:
        e = index.entry(key)
        assert [type(c) for c in e.copies] == [Copy, Copy] and e.replicas == e.copies[1:]
        assert [c.node_id for c in e.copies] == [a.node_id, b.node_id]
        assert not index.add_replica(e, b.node_id, "dram", b.allocate("dram", BLOCK))   # one copy per node
    assert index.tier_blocks(a.node_id, "dram") == index.tier_blocks(b.node_id, "dram") == 3
    (row,) = [r for r in index.tenant_usage() if r[1] == "dram"]
    assert row[2:4] == (3 * BLOCK, 3)                     # a block counts once, whatever its copies
    index.evict_from(a.node_id, "dram", None)             # the first copies go: B's are read now
    assert all(index.entry(k).node_id == b.node_id for k in keys)
    (row,) = [r for r in index.tenant_usage() if r[1] == "dram"]
    assert row[2:4] == (3 * BLOCK, 3)


def test_a_replica_over_its_nodes_watermark_demotes_to_that_nodes_nvme(env):
    index, a, b, tiering, ns = env
    keys, data = put_replicated(index, a, b, ns, 4)
    assert asyncio.run(tiering.demote(b, None)) == (4, 4 * BLOCK)
    for key in keys:
        e = index.entry(key)
        on_a, on_b = e.copy_on(a.node_id), e.copy_on(b.node_id)
        assert on_a.mem is not None and on_b.mem is None and on_b.nvme is not None
        assert e.copies[0] is on_a                         # still read from A's DRAM
    assert b.tiers["dram"].used_bytes == 0 and len(b.mover.catalog) == 4 and len(a.mover.catalog) == 0
    assert index.tier_blocks(b.node_id, "nvme") == 4 and index.tier_blocks(b.node_id, "dram") == 0

    # Node A goes: B's NVMe copies are the blocks now, and a read promotes them there.
    index.forget_node(a.node_id)
    index.nodes.remove(a.node_id)
    hits, lease = index.lookup(ns, keys)
    assert hits == 4 and all(e.node_id == b.node_id and e.mem is None for e in lease.entries)
    assert asyncio.run(tiering.make_resident(lease.entries, "host-c")) == [True] * 4
    for e in lease.entries:
        assert read(b, e.mem) == data[e.key].tobytes()     # the bytes, checksum verified on the way
    index.release([lease.lease_id])


def test_a_read_promotes_the_nvme_copy_on_the_readers_host(env):
    index, a, b, tiering, ns = env
    keys, data = put_replicated(index, a, b, ns, 2)
    asyncio.run(tiering.demote(b, None))
    asyncio.run(tiering.demote(a, None))
    for k in keys:                                         # A's copy is still the first one
        assert index.entry(k).mem is None and [c.node_id for c in index.entry(k).copies] == [a.node_id, b.node_id]
    _, lease = index.lookup(ns, keys)
    assert asyncio.run(tiering.make_resident(lease.entries, "host-b")) == [True, True]
    for e in lease.entries:
        assert e.node_id == b.node_id and read(b, e.mem) == data[e.key].tobytes()
        assert e.copy_on(a.node_id).mem is None            # A's copy was not read back
    assert a.tiers["dram"].used_bytes == 0 and index.counters.promoted_blocks == 2
    index.release([lease.lease_id])


def test_a_corrupt_nvme_copy_goes_and_the_block_is_read_from_another(env):
    index, a, b, tiering, ns = env
    (key,), data = put_replicated(index, a, b, ns, 1)
    asyncio.run(tiering.demote(b, None))
    nvme = index.entry(key).copy_on(b.node_id).nvme
    with open(b.mover.nvme.path, "r+b") as f:           # flip a byte of B's copy on disk
        f.seek(nvme.offset + 100)
        byte = f.read(1)
        f.seek(nvme.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    asyncio.run(tiering.demote(a, None))                  # now no copy is in memory
    _, lease = index.lookup(ns, [key])
    assert asyncio.run(tiering.make_resident(lease.entries, "host-b")) == [False]   # never served
    e = index.entry(key)
    assert e is not None and [c.node_id for c in e.copies] == [a.node_id] and index.counters.corrupt_blocks == 1
    index.release([lease.lease_id])
    _, lease = index.lookup(ns, [key])
    assert asyncio.run(tiering.make_resident(lease.entries, "host-b")) == [True]    # A's copy
    assert read(a, e.mem) == data[key].tobytes()
    index.release([lease.lease_id])
