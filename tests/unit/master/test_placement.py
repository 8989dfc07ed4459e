"""Host-aware placement, lost grants and reader-reported corruption, on the master's index.

The nodes are the master's real mirrors of nodes in other processes (RemoteNode, built from
the registration a node sends); nothing here moves bytes, so no node process is needed.
"""

from __future__ import annotations

import os

import pytest

from kvpool.errors import Unavailable
from kvpool.identity import Namespace
from kvpool.layout import KVLayout
from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.master.remote import RemoteNode
from kvpool.rpc.v1 import node_pb2
from kvpool.transport.endpoint import NodeEndpoint

LAYOUT = KVLayout(1, 1, 64, "float16", 16)  # 4 KiB blocks
BLOCK = LAYOUT.block_bytes


def remote(node_id: int, host: str, blocks: int, tcp: bool = True) -> RemoteNode:
    req = node_pb2.RegisterNodeRequest(name=f"node-{node_id}", control_address=f"127.0.0.1:{9000 + node_id}",
                                       incarnation="x", data_key=os.urandom(32))
    req.tiers.add(tier="dram", capacity_bytes=blocks * BLOCK, chunk_bytes=BLOCK)
    NodeEndpoint(0, f"node-{node_id}", host, tcp_address="10.0.0.1:1" if tcp else "").fill(req.endpoint)
    return RemoteNode(node_id, req)


@pytest.fixture
def cluster():
    nodes = NodeRegistry()
    for n in (remote(1, "host-a", 8), remote(2, "host-b", 32), remote(3, "host-c", 64, tcp=False)):
        nodes.add(n)
    index = BlockIndex(nodes, IndexConfig(eviction_policy="lru"))
    ns = Namespace("m", LAYOUT)
    index.register_namespace(ns)
    return index, ns.id


def placed(index, ns, host: str, n: int = 2, exclude=()) -> int:
    grant, _ = index.put_start(ns, [os.urandom(16) for _ in range(n)], [BLOCK] * n, client_host=host,
                               exclude=exclude)
    (node_id,) = {e.node_id for e in grant.entries.values()}
    return node_id


def test_writer_gets_its_own_host_while_it_has_room(cluster):
    index, ns = cluster
    assert placed(index, ns, "host-a") == 1                 # local, though node 2 has more room
    assert placed(index, ns, "host-a", n=7) == 2            # local has 6 free of 8: the roomiest reachable
    assert placed(index, ns, "host-c") == 3                 # same host: shared memory reaches it


def test_writer_never_gets_a_node_it_cannot_reach(cluster):
    index, ns = cluster
    # Node 3 has the most room but no data server: only its own host can write to it.
    assert placed(index, ns, "host-z") == 2
    assert placed(index, ns, "host-a", exclude=[1]) == 2    # a retry skips the node that failed
    with pytest.raises(Unavailable, match="excluding nodes \\[1, 2\\]"):
        placed(index, ns, "host-a", exclude=[1, 2])


def test_commit_after_the_node_left_names_it(cluster):
    index, ns = cluster
    grant, _ = index.put_start(ns, [os.urandom(16)], [BLOCK], client_host="host-a")
    index.forget_node(1)
    with pytest.raises(Unavailable, match="node node-1 holding slots of put .* left the pool.*PutStart again"):
        index.put_commit(grant.put_id, None, [0])


def test_reader_reported_corruption_drops_the_replica(cluster):
    index, ns = cluster
    ks = [os.urandom(16) for _ in range(2)]
    grant, _ = index.put_start(ns, ks, [BLOCK] * 2, client_host="host-b")
    index.put_commit(grant.put_id, None, [1, 2])
    _, lease = index.get(ns, ks)
    # A key the lease does not hold is ignored: a reader can only report what it read.
    assert index.release([lease.lease_id], [ks[1], os.urandom(16)]) == (1, 1)
    assert index.counters.corrupt_blocks == 1
    assert index.entry(ks[1]) is None and index.entry(ks[0]) is not None
    assert index.nodes.get(2).usage()[0].used_bytes == BLOCK   # the dropped slot was freed
