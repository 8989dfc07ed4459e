"""A removed block never comes back after a failover or a master restart (real processes, a
real redis-server).

A node applies removals lazily (the answer to its next heartbeat frees a memory slot, the
tiering task's next DropNvme an NVMe copy), and until then it reports the block when it
registers again. The node is stopped (SIGSTOP) across the removal and the leader's death so
that it has applied none of it:

* With Redis: the leader writes a tombstone per copy with the deletion of the block's record;
  the standby that takes over loads them, does not serve what they name and frees it on the
  node; the tombstones go once the node confirms. A third master, taking over later, hears
  from the node only the blocks that were not removed.
* Redis restarted empty: the leader writes its tombstones again; the stopped node, declared
  dead and back, registers with the same master and is not served its removed blocks.
* Without Redis: ``Remove`` is answered after the node applied it (``ApplyChanges``), so a
  master restarted at once is not told of the removed blocks.
* ``ApplyChanges`` with changes a node cannot apply: INVALID_ARGUMENT, and the node serves on.
"""

from __future__ import annotations

import re
import signal

import grpc
import pytest

from kvpool import Client
from kvpool.rpc.v1 import admin_pb2, node_pb2, node_pb2_grpc
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, wait_for
from tests.integration.pool_procs import pool_procs  # noqa: F401  (fixture)
from tests.integration.redis_server import redis_server  # noqa: F401  (fixture)
from tests.integration.rpc_helpers import stubs
from tests.integration.test_failover import node_count
from tests.integration.test_master_recovery import unapplied

PROMPTS = 6                    # prompts 0, 1 are moved to NVMe; 2..5 stay in DRAM
REMOVED = {0, 2, 4}            # one NVMe prompt and two DRAM prompts
SLOW = ("--heartbeat-interval", "0.5")


def prompt(i: int) -> list[int]:
    return list(range(i * 1000, i * 1000 + 2 * SMALL.block_tokens))    # two blocks each


def publish(address: str, ns) -> dict[int, bytes]:
    data = {i: random_blocks(2, seed=i) for i in range(PROMPTS)}
    with Client(address, ns) as c:
        for i in (0, 1):
            c.publish(prompt(i), data[i])
        with stubs(address.split(",")[0]) as (_, admin):                 # those two go to NVMe
            admin.Evict(admin_pb2.EvictRequest(all=True), timeout=30)
        for i in range(2, PROMPTS):
            c.publish(prompt(i), data[i])
    return {i: d.tobytes() for i, d in data.items()}


def remove(address: str, ns, removed=REMOVED) -> int:
    with Client(address, ns) as c:
        return sum(c.remove(ns.keys(prompt(i))) for i in removed)


def check_served(address: str, ns, data: dict[int, bytes], removed=REMOVED) -> None:
    """Removed prompts: not one block served; the others: every block, bytes verified."""
    with Client(address, ns, timeout=10) as c:
        for i, want in data.items():
            out = bytearray(2 * SMALL.block_bytes)
            got = c.fetch(prompt(i), out)
            if i in removed:
                assert got == 0, f"removed prompt {i}: {got} blocks served again"
            else:
                assert got == 2 and bytes(out) == want, f"prompt {i}: {got} blocks"


def registered_with(node, nth: int) -> tuple[int, int]:
    """(memory, NVMe) blocks the node reported at its ``nth`` registration (from its log,
    which says so just after the master answered)."""
    pattern = r"registered with master \S+ as node \d+ \((\d+) blocks in memory, (\d+) on NVMe\)"
    wait_for(lambda: len(re.findall(pattern, node.log())) > nth, timeout=10)
    found = re.findall(pattern, node.log())
    return tuple(map(int, found[nth])) if len(found) > nth else (-1, -1)


def test_removed_blocks_stay_removed_across_a_failover(pool_procs, redis_server):
    master, node = pool_procs
    # Heartbeats every 0.5 s: the stopped node is declared dead only after 2.5 s, long after
    # the removal is answered.
    a = master("--redis", redis_server.url, *SLOW, ready=r"ready grpc=(\S+)")
    b = master("--redis", redis_server.url, *SLOW, ready=r"standby grpc=(\S+)")
    masters = f"{a.address},{b.address}"
    n = node(masters, "node-a", "--nvme", "16MiB")
    assert wait_for(lambda: node_count(a.address) == 1, timeout=15)
    ns = fresh_namespace()
    data = publish(masters, ns)
    assert wait_for(lambda: unapplied(a.address) == 0, timeout=20, interval=0.3)
    n.kill(signal.SIGSTOP)                       # it applies nothing from here on
    try:
        assert remove(masters, ns) == 2 * len(REMOVED)
        r = redis_server.client()
        assert r.hlen("kvpool:removed") == 2 * len(REMOVED)    # answered after its tombstones were written
        a.kill()                                 # SIGKILL before the node heard of the removal
    finally:
        n.kill(signal.SIGCONT)
    assert b.wait_log(r"took over with fencing epoch 2", timeout=20)
    assert wait_for(lambda: node_count(b.address) == 1, timeout=15)
    assert registered_with(n, 1) == (8, 4)       # it still held every block it was given
    with Client(masters, ns, timeout=10) as c:   # the new leader serves none of the removed ones
        assert [c.match(prompt(i)) for i in range(PROMPTS)] == [0 if i in REMOVED else 2 for i in range(PROMPTS)]
    # The node frees them (the answer to a heartbeat, a DropNvme) and confirms: the tombstones go.
    assert wait_for(lambda: r.hlen("kvpool:removed") == 0, timeout=20, interval=0.2), r.hkeys("kvpool:removed")
    # A third master where the first one was (the node and clients know that address).
    c3 = master("--redis", redis_server.url, *SLOW, port=int(a.address.rsplit(":", 1)[1]), ready=r"standby grpc=(\S+)")
    b.kill()
    assert c3.wait_log(r"took over with fencing epoch 3", timeout=20)
    assert wait_for(lambda: node_count(c3.address) == 1, timeout=15)
    assert registered_with(n, 2) == (4, 2)       # the node holds only what was not removed
    check_served(masters, ns, data)


def test_without_redis_remove_is_answered_once_the_node_applied_it(pool_procs):
    master, node = pool_procs
    # Heartbeats 5 s apart: the node hears of nothing through them between the publishes and
    # the kill (checked below), only through ApplyChanges.
    m = master("--heartbeat-interval", "5", ready=r"ready grpc=(\S+)")
    port = int(m.address.rsplit(":", 1)[1])
    n = node(m.address, "node-a", "--nvme", "16MiB")
    assert wait_for(lambda: node_count(m.address) == 1, timeout=15)
    ns = fresh_namespace()
    data = publish(m.address, ns)                # the node hears of these with the Remove below
    assert remove(m.address, ns) == 2 * len(REMOVED)
    m.kill()                                     # SIGKILL right after the answer
    m2 = master("--heartbeat-interval", "0.2", port=port, ready=r"ready grpc=(\S+)")
    assert wait_for(lambda: node_count(m2.address) == 1, timeout=30)   # within two 5 s heartbeats
    assert registered_with(n, 1) == (4, 2)
    check_served(m2.address, ns, data)


def test_apply_changes_refuses_what_a_node_cannot_apply_and_keeps_serving(pool_procs):
    master, node = pool_procs
    m = master(ready=r"ready grpc=(\S+)")
    n = node(m.address, "node-a", "--nvme", "16MiB")
    assert wait_for(lambda: node_count(m.address) == 1, timeout=15)
    key, size = b"k" * 16, SMALL.block_bytes
    bad = {
        "names the gpu tier, which this node does not have": [node_pb2.ResidentBlock(tier="gpu", offset=0, size=size)],
        "keeps its own catalog; changes are for memory tiers": [node_pb2.ResidentBlock(tier="nvme", offset=0, size=size)],
        "lies outside the dram tier": [node_pb2.ResidentBlock(tier="dram", offset=1 << 40, size=size, key=key)],
        "a block key is 16 bytes": [node_pb2.ResidentBlock(tier="dram", offset=0, size=size, key=b"short")],
    }
    with grpc.insecure_channel(n.address) as ch:
        stub = node_pb2_grpc.NodeControlStub(ch)
        for words, changes in bad.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.ApplyChanges(node_pb2.ApplyChangesRequest(changes=changes, changes_seq=1), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ApplyChanges(node_pb2.ApplyChangesRequest(changes=bad["a block key is 16 bytes"] * 2, changes_seq=1),
                              timeout=5)
        assert "2 changes cannot end at sequence number 1" in info.value.details()
    ns = fresh_namespace()
    with Client(m.address, ns) as c:                     # the node still serves, and lost nothing
        data = random_blocks(2, seed=5)
        c.publish(prompt(0), data)
        out = bytearray(2 * SMALL.block_bytes)
        assert c.fetch(prompt(0), out) == 2 and bytes(out) == data.tobytes()


def test_tombstones_survive_a_redis_restart_and_a_node_declared_dead_and_back(pool_procs, redis_server):
    """Redis restarted empty: the leader writes its tombstones again with the rest. The stopped
    node is declared dead, then registers again with the same master, reporting every block
    it held: the removed ones are not served, and their tombstones end once it freed them."""
    master, node = pool_procs
    a = master("--redis", redis_server.url, *SLOW, ready=r"ready grpc=(\S+)")
    n = node(a.address, "node-a", "--nvme", "16MiB")
    assert wait_for(lambda: node_count(a.address) == 1, timeout=15)
    ns = fresh_namespace()
    data = publish(a.address, ns)
    assert wait_for(lambda: unapplied(a.address) == 0, timeout=20, interval=0.3)
    n.kill(signal.SIGSTOP)
    # DRAM prompts only: an NVMe drop sent to the stopped node would hold the master's sweeper
    # (which also declares nodes dead) for the drop's 60 s timeout.
    removed = {2, 4}
    try:
        assert remove(a.address, ns, removed) == 2 * len(removed)
        redis_server.kill()
        redis_server.start()                                          # empty
        r = redis_server.client()
        assert wait_for(lambda: r.hlen("kvpool:removed") == 2 * len(removed), timeout=20, interval=0.2)
        assert wait_for(lambda: node_count(a.address) == 0, timeout=20, interval=0.2)   # declared dead
    finally:
        n.kill(signal.SIGCONT)
    assert wait_for(lambda: node_count(a.address) == 1, timeout=15)
    assert registered_with(n, 1) == (8, 4)
    assert wait_for(lambda: r.hlen("kvpool:removed") == 0, timeout=20, interval=0.2), r.hkeys("kvpool:removed")
    check_served(a.address, ns, data, removed)


def test_a_hung_node_with_nvme_drops_pending_does_not_stall_the_masters_sweep(pool_procs):
    """A node stopped (SIGSTOP) while NVMe drops for it are pending: each DropNvme to it waits
    for its RPC timeout (60 s). That wait is the tier mover's own; the sweep that forgets
    silent nodes (and expires leases and grants) goes on: the node is declared dead after
    its missed heartbeats, not after the timeout."""
    master, node = pool_procs
    m = master("--heartbeat-interval", "2", ready=r"ready grpc=(\S+)")   # dead after 5 x 2 s
    n = node(m.address, "node-a", "--nvme", "16MiB")
    assert wait_for(lambda: node_count(m.address) == 1, timeout=15)
    ns = fresh_namespace()
    publish(m.address, ns)                       # prompts 0 and 1 on NVMe
    n.kill(signal.SIGSTOP)
    assert remove(m.address, ns, {0}) == 2       # its NVMe drop is not confirmed (5 s), then queued
    assert m.wait_log(r"node node-a did not confirm a removal", timeout=5) is not None
    assert m.wait_log(r"node node-a \(id \d+\) missed 5 heartbeats", timeout=25) is not None, m.log()[-3000:]
    n.kill(signal.SIGCONT)
