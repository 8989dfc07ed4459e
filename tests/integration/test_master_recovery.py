"""A master that dies without Redis: its node is the truth for its bytes (issue 10, point 1).

The node learns which of its memory slots hold committed blocks from the master's answers to
its heartbeats. After ``kill -9`` of the master, a new master on the same address hears the
node register again with those blocks and its NVMe blocks, and serves all of them.
"""

from __future__ import annotations

import json

from kvpool import Client
from kvpool.rpc.v1 import admin_pb2, common_pb2
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, wait_for
from tests.integration.rpc_helpers import stubs
from tests.integration.test_admin_cli import admin
from tests.integration.test_cluster import cluster, registered  # noqa: F401  (fixture)


def unapplied(address: str) -> int:
    """``kvpool admin --json nodes``, as the README shows it: changes the nodes have not applied."""
    res = admin(address, "--json", "nodes")
    assert res.returncode == 0, res.stderr
    nodes = json.loads(res.stdout)["nodes"]
    return sum(int(n["unapplied_changes"]) for n in nodes) if nodes else -1


def test_kill_9_master_without_redis_serves_dram_and_nvme_blocks_again(cluster):
    master, node = cluster
    m, address = master()
    port = int(address.rsplit(":", 1)[1])
    n = node(address, "node-a", "--nvme", "16MiB")
    assert registered(address)
    ns = fresh_namespace()
    on_nvme, in_dram = list(range(16 * 4)), list(range(1000, 1000 + 16 * 5))
    nvme_data, dram_data = random_blocks(4, seed=1), random_blocks(5, seed=2)
    with Client(address, ns) as c:
        c.publish(on_nvme, nvme_data)
        with stubs(address) as (_, admin):                               # the first prompt goes to NVMe
            admin.Evict(admin_pb2.EvictRequest(all=True), timeout=30)
        c.publish(in_dram, dram_data)                                    # the second stays in DRAM
        assert {b.tier for b in admin_blocks(address)} == {common_pb2.TIER_NVME, common_pb2.TIER_DRAM}
    # The node hears of the commits on the answers to its heartbeats.
    assert wait_for(lambda: unapplied(address) == 0, timeout=20, interval=0.5)
    m.kill()                                                             # SIGKILL: nothing flushed
    _, address2 = master(port)
    assert address2 == address and registered(address)
    with Client(address, ns) as c:
        assert wait_for(lambda: c.match(in_dram) == 5 and c.match(on_nvme) == 4, timeout=15)
        out = bytearray(5 * SMALL.block_bytes)
        assert c.fetch(in_dram, out) == 5 and bytes(out) == dram_data.tobytes()
        out = bytearray(4 * SMALL.block_bytes)
        assert c.fetch(on_nvme, out) == 4 and bytes(out) == nvme_data.tobytes()
    assert "(5 blocks in memory, 4 on NVMe)" in n.log()


def admin_blocks(address: str):
    with stubs(address) as (_, admin):
        return admin.ListBlocks(admin_pb2.ListBlocksRequest(limit=100)).blocks
