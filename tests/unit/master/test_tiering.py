"""Tiering against a real node (shm DRAM + NVMe files): the races the pins must win."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import xxhash

from kvpool.identity import Namespace
from kvpool.layout import KVLayout
from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.master.tiering import Tiering
from kvpool.node.node import Node

LAYOUT = KVLayout(1, 1, 1024, "float16", 16)  # 64 KiB blocks
BLOCK = LAYOUT.block_bytes


@pytest.fixture
def env(tmp_path):
    node = Node.build(1, "n1", dram_bytes=4 << 20, nvme_bytes=8 << 20, data_dir=str(tmp_path),
                      chunk_bytes=1 << 20, prefault=False)
    nodes = NodeRegistry()
    nodes.add(node)
    index = BlockIndex(nodes, IndexConfig(eviction_policy="lru"))
    ns = Namespace("m", LAYOUT)
    index.register_namespace(ns)
    yield index, node, Tiering(index), ns.id
    node.close()


def put(index, node, ns, n):
    keys = [os.urandom(16) for _ in range(n)]
    grant, _ = index.put_start(ns, keys, [BLOCK] * n)
    sums = []
    for key in keys:
        data = np.random.default_rng(len(sums)).integers(0, 256, BLOCK, dtype=np.uint8)
        node.tiers["dram"].write(grant.entries[key].mem, data)
        sums.append(xxhash.xxh3_64_intdigest(data))
    index.put_commit(grant.put_id, None, sums)
    return keys


def test_a_lease_taken_during_demotion_keeps_the_dram_copy(env):
    index, node, tiering, ns = env
    keys = put(index, node, ns, 4)

    async def run():
        task = asyncio.create_task(tiering.demote(node, None))
        await asyncio.sleep(0)                      # victims chosen and pinned; copies in flight
        hits, lease = index.lookup(ns, keys)        # a reader arrives meanwhile
        assert hits == 4
        await task
        return lease

    lease = asyncio.run(run())
    for key in keys:
        entry = index.entry(key)
        assert entry.mem is not None and entry.nvme is not None   # both copies: DRAM still served
    index.release([lease.lease_id])
    # Without readers, the next demotion lets the DRAM copies go without any I/O.
    asyncio.run(tiering.demote(node, None))
    assert all(index.entry(k).mem is None and index.entry(k).nvme is not None for k in keys)
    assert node.tiers["dram"].used_bytes == 0


def test_removed_during_demotion_frees_both_copies(env):
    index, node, tiering, ns = env
    keys = put(index, node, ns, 3)

    async def run():
        task = asyncio.create_task(tiering.demote(node, None))
        await asyncio.sleep(0)
        assert index.remove(keys) == (0, 3)          # pinned by the mover: deferred
        await task
        await tiering.flush_drops()

    asyncio.run(run())
    assert node.tiers["dram"].used_bytes == 0
    assert node.tiers["nvme"].used_bytes == 0 and len(node.mover.catalog) == 0


def test_promotion_verifies_and_counts(env):
    index, node, tiering, ns = env
    keys = put(index, node, ns, 2)
    asyncio.run(tiering.demote(node, None))
    _, lease = index.lookup(ns, keys)
    ok = asyncio.run(tiering.make_resident(lease.entries))
    assert ok == [True, True] and index.counters.promoted_blocks == 2
    out = bytearray(BLOCK)
    node.tiers["dram"].read_into(index.entry(keys[0]).mem, out)
    assert xxhash.xxh3_64_intdigest(out) == index.entry(keys[0]).checksum
