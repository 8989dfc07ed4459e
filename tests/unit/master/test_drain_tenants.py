"""A drain signs each pull's read capability for the tenant whose blocks it moves.

Capabilities are ``kvpool-cap/v2``: they sign the tenant, so one capability covers the blocks
of one tenant. A drain of a node holding two tenants' blocks must pull each tenant's blocks
under a capability of that tenant, which the source node's data server verifies.
"""

from __future__ import annotations

import asyncio
import os

from kvpool.capability import verify
from kvpool.identity import Namespace
from kvpool.layout import KVLayout
from kvpool.master.drain import Drainer
from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.node.node import Node
from kvpool.wire import unpack_records

LAYOUT = KVLayout(1, 1, 64, "float16", 16)  # 4 KiB blocks
BLOCK = LAYOUT.block_bytes


class RecordingTarget:
    """A real node as the drain's target, whose pull records the capability instead of copying."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.pulls = []

    def __getattr__(self, name):
        return getattr(self._node, name)

    async def pull(self, source, access, tier, slots, keys=(), namespace_ids=()):
        self.pulls.append((source, access, list(slots)))
        return []


def test_a_drain_pulls_each_tenants_blocks_under_its_own_capability():
    source = Node.with_dram(1, "n1", 16 * BLOCK, chunk_bytes=16 * BLOCK, prefault=False)
    target_node = Node.with_dram(2, "n2", 16 * BLOCK, chunk_bytes=16 * BLOCK, prefault=False)
    try:
        nodes = NodeRegistry()
        nodes.add(source)
        index = BlockIndex(nodes, IndexConfig(high_watermark=1.0, low_watermark=1.0))
        held = {}
        for tenant, n in (("alice", 3), ("bob", 2), ("", 1)):
            ns = Namespace("m", LAYOUT, tenant=tenant)
            index.register_namespace(ns)
            grant, _ = index.put_start(ns.id, [os.urandom(16) for _ in range(n)], [BLOCK] * n)
            index.put_commit(grant.put_id, None, list(range(n)))
            held[tenant] = {e.record for e in index.entries() if e.tenant == tenant}
        target = RecordingTarget(target_node)
        nodes.add(target)

        report = asyncio.run(Drainer(index, None).drain(source, drop=False))

        assert report.moved == 6 and report.failed == 0 and report.remaining == 0
        assert sorted(a.tenant for _, a, _ in target.pulls) == ["", "alice", "bob"]
        for ep, access, slots in target.pulls:
            assert ep.node_id == source.node_id and len(slots) == len(unpack_records(access.records))
            # What the source's data server checks: the MAC covers these records for this tenant.
            verify(source.data_key, access.op, access.grant_id, access.node_id, access.expires_unix_ms,
                   access.records, access.mac, tenant=access.tenant)
            records = {access.records[i:i + 32] for i in range(0, len(access.records), 32)}
            assert records == held[access.tenant]
        assert all(e.node_id == target.node_id for e in index.entries())
    finally:
        source.close()
        target_node.close()
