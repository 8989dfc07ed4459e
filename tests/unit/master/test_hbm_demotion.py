"""HBM over its watermark demotes to DRAM instead of dropping blocks (kvpool.master.tiering).

A real node and index; the HBM arena is a stand-in that keeps its bytes in host memory and
declares the device tier's capabilities, since CI has no GPU. The real HbmArena is covered
by tests/gpu/test_hbm_demotion_gpu.py on a GPU.
"""

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
from kvpool.tiers.base import TierCaps
from kvpool.tiers.dram import DramArena

LAYOUT = KVLayout(1, 1, 1024, "float16", 16)  # 64 KiB blocks
BLOCK = LAYOUT.block_bytes


class HostBackedHbm(DramArena):
    """The HBM tier's flags over host bytes (not shared, not served by the data plane)."""

    name = "hbm"
    caps = TierCaps.DEVICE | TierCaps.ADDRESSABLE


@pytest.fixture
def env():
    node = Node(1, "n1", [HostBackedHbm(8 * BLOCK, chunk_bytes=8 * BLOCK, prefault=False),
                          DramArena(8 * BLOCK, chunk_bytes=8 * BLOCK, prefault=False)])
    nodes = NodeRegistry()
    nodes.add(node)
    index = BlockIndex(nodes, IndexConfig(eviction_policy="lru"))
    ns = Namespace("m", LAYOUT)
    index.register_namespace(ns)
    yield index, node, Tiering(index), ns.id
    node.close()


def put_hbm(index, node, ns, n, seed=0):
    keys = [os.urandom(16) for _ in range(n)]
    grant, _ = index.put_start(ns, keys, [BLOCK] * n, tier="hbm")
    data, sums = {}, []
    for i, key in enumerate(keys):
        entry = grant.entries[key]
        assert entry.mem_tier == "hbm"
        data[key] = np.random.default_rng(seed + i).integers(0, 256, BLOCK, dtype=np.uint8)
        node.tiers["hbm"].write(entry.mem, data[key])
        sums.append(xxhash.xxh3_64_intdigest(data[key]))
    index.put_commit(grant.put_id, None, sums)
    return keys, data


def read(node, entry) -> np.ndarray:
    out = np.empty(entry.size, np.uint8)
    node.tiers[entry.mem_tier].read_into(entry.mem, out)
    return out


def test_a_full_hbm_moves_its_coldest_blocks_to_dram(env):
    index, node, tiering, ns = env
    keys, data = put_hbm(index, node, ns, 8)           # 8 of 8 slots: over the 95% watermark
    assert index.block_count == 8                       # the commit evicted nothing
    asyncio.run(tiering.cycle())
    tiers = {k: index.entry(k).mem_tier for k in keys}
    assert list(tiers.values()).count("dram") == 1 and tiers[keys[0]] == "dram"   # LRU: the oldest
    assert node.tiers["hbm"].usage().used_slots == 7 and node.tiers["dram"].usage().used_slots == 1
    hits, lease = index.lookup(ns, keys)
    assert hits == 8                                    # every block readable, its bytes intact
    for e in lease.entries:
        assert np.array_equal(read(node, e), data[e.key])
    assert index.counters.demoted_blocks == 1 and sum(index.counters.evictions.values()) == 0


def test_a_leased_hbm_block_is_not_moved(env):
    index, node, tiering, ns = env
    keys, _ = put_hbm(index, node, ns, 8)
    _, lease = index.lookup(ns, keys)                   # a reader holds every block
    asyncio.run(tiering.cycle())
    assert {index.entry(k).mem_tier for k in keys} == {"hbm"}
    assert node.tiers["dram"].usage().used_slots == 0   # the slots taken for the copy were freed
    index.release([lease.lease_id])
    asyncio.run(tiering.cycle())
    assert [index.entry(k).mem_tier for k in keys].count("dram") == 1


def test_a_block_damaged_in_hbm_is_dropped_not_served(env):
    index, node, tiering, ns = env
    keys, _ = put_hbm(index, node, ns, 8)
    victim = index.entry(keys[0])
    node.tiers["hbm"].write(victim.mem, np.zeros(BLOCK, np.uint8))   # bytes no longer match
    asyncio.run(tiering.cycle())
    assert index.entry(keys[0]) is None and index.counters.corrupt_blocks == 1
    assert node.tiers["dram"].usage().used_slots == 0 and node.tiers["hbm"].usage().used_slots == 7


def test_a_put_that_does_not_fit_in_hbm_goes_to_dram_instead_of_evicting(env):
    index, node, tiering, ns = env
    first, _ = put_hbm(index, node, ns, 6)
    grant, _ = index.put_start(ns, [os.urandom(16) for _ in range(4)], [BLOCK] * 4, tier="hbm")
    assert {e.mem_tier for e in grant.entries.values()} == {"dram"}
    assert all(index.entry(k) is not None for k in first)
