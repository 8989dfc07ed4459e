"""Standby masters and failover through a Redis lease with a fencing epoch (real processes,
a real redis-server).

* kill -9 of the leader in the middle of a stream of puts and gets: the standby takes over,
  the client and the node follow it (``--master a,b``), every block whose commit the client
  saw is still served, and no read ever returns wrong bytes.
* A leader stopped with SIGSTOP is deposed; woken later, it grants nothing: it refuses
  every call (naming the new leader) and the node refuses its old epoch.
* Tenant quotas live in Redis: a standby started without ``--quotas`` that takes over
  enforces the leader's; one started with ``--quotas`` makes its own the pool's.
"""

from __future__ import annotations

import signal
import json
import time

import grpc
import pytest

from kvpool import Client, errors
from kvpool.identity import pack_keys
from kvpool.rpc.v1 import common_pb2, node_pb2, node_pb2_grpc, pool_pb2
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, wait_for
from tests.integration.pool_procs import pool_procs  # noqa: F401  (fixture)
from tests.integration.redis_server import free_port, redis_server  # noqa: F401  (fixture)
from tests.integration.rpc_helpers import stubs
from tests.integration.test_admin_cli import admin


def node_count(address: str) -> int:
    try:
        with stubs(address) as (_, admin):
            return admin.Stats(common_pb2.StatsRequest(), timeout=5).nodes
    except grpc.RpcError:
        return -1


def two_masters(master, redis_url: str):
    a = master("--redis", redis_url, ready=r"ready grpc=(\S+)")
    b = master("--redis", redis_url, ready=r"standby grpc=(\S+)")
    return a, b


def test_kill_9_leader_during_puts_and_gets(pool_procs, redis_server):
    master, node = pool_procs
    a, b = two_masters(master, redis_server.url)
    node(f"{a.address},{b.address}", "node-a")
    assert wait_for(lambda: node_count(a.address) == 1, timeout=15)
    ns = fresh_namespace()
    acked: dict[int, bytes] = {}
    wrong = failed_puts = 0
    killed_at = None
    with Client(f"{a.address},{b.address}", ns, timeout=10) as c:
        i = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            toks = list(range(i * 1000, i * 1000 + 32))
            data = random_blocks(2, seed=i)
            try:
                c.publish(toks, data)
                acked[i] = data.tobytes()
            except errors.KvpoolError:
                failed_puts += 1                       # in flight when the leader died: not acked
            j = i // 2                                 # read an older prompt back
            if j in acked:
                out = bytearray(2 * SMALL.block_bytes)
                try:
                    got = c.fetch(list(range(j * 1000, j * 1000 + 32)), out)
                except errors.KvpoolError:
                    got = 0
                if got and bytes(out[: got * SMALL.block_bytes]) != acked[j][: got * SMALL.block_bytes]:
                    wrong += 1
            i += 1
            if killed_at is None and i == 15:
                a.kill()                               # SIGKILL, mid-stream
                killed_at = time.monotonic()
            if killed_at is not None and len(acked) >= 35:
                break
        assert killed_at is not None and b.wait_log(r"took over with fencing epoch 2", timeout=1)
        assert len(acked) >= 35 and failed_puts <= 2
        lost = 0
        for j, data in acked.items():                  # every acknowledged block, from the new leader
            out = bytearray(2 * SMALL.block_bytes)
            if c.fetch(list(range(j * 1000, j * 1000 + 32)), out) != 2:
                lost += 1
            elif bytes(out) != data:
                wrong += 1
    assert (lost, wrong) == (0, 0), f"{lost} acknowledged prompts lost, {wrong} reads with wrong bytes"


def test_sigstopped_leader_woken_later_cannot_grant(pool_procs, redis_server):
    master, node = pool_procs
    a, b = two_masters(master, redis_server.url)
    n = node(f"{a.address},{b.address}", "node-a")
    assert wait_for(lambda: node_count(a.address) == 1, timeout=15)
    ns = fresh_namespace()
    toks, data = list(range(64)), random_blocks(4, seed=9)
    with Client(a.address, ns) as c:
        c.publish(toks, data)
    a.kill(signal.SIGSTOP)                              # frozen: its lease lapses
    try:
        assert b.wait_log(r"took over with fencing epoch 2", timeout=20)
        assert wait_for(lambda: node_count(b.address) == 1, timeout=15)
    finally:
        a.kill(signal.SIGCONT)                          # woken: it still believes it leads
    with stubs(a.address) as (pool, _):
        with pytest.raises(grpc.RpcError) as info:
            pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns.id, keys=pack_keys(ns.keys(list(range(5000, 5016)))),
                                                   sizes=[SMALL.block_bytes]), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(info.value.trailing_metadata())["kvpool-leader"] == b.address
    assert f"it stands by; the leader is at {b.address}" in info.value.details()
    a.proc.wait(timeout=15)                             # and it steps down for good
    assert "deposed" in a.log()
    # The node refuses the old epoch outright.
    with grpc.insecure_channel(n.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            node_pb2_grpc.NodeControlStub(ch).DropNvme(node_pb2.DropNvmeRequest(epoch=1), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "epoch 1 is older than 2" in info.value.details()
    with Client(f"{a.address},{b.address}", ns) as c:   # nothing lost, right bytes, from the new leader
        out = bytearray(4 * SMALL.block_bytes)
        assert c.fetch(toks, out) == 4 and bytes(out) == data.tobytes()
    # The admin CLI, given both masters, answers from the leader.
    res = admin(f"{a.address},{b.address}", "stats")
    assert res.returncode == 0, res.stderr
    assert "redis up" in res.stdout and "fencing epoch 2" in res.stdout


def test_redis_restarted_empty_the_leader_keeps_its_lease(pool_procs, redis_server):
    """A standby must not take over just because Redis lost the lease: the leader is alive."""
    master, node = pool_procs
    a, b = two_masters(master, redis_server.url)
    node(f"{a.address},{b.address}", "node-a")
    assert wait_for(lambda: node_count(a.address) == 1, timeout=15)
    ns = fresh_namespace()
    toks, data = list(range(48)), random_blocks(3, seed=2)
    with Client(f"{a.address},{b.address}", ns) as c:
        c.publish(toks, data)
        redis_server.kill()
        redis_server.start()                            # empty: no lease, no epoch, no blocks
        r = redis_server.client()
        assert wait_for(lambda: (r.get("kvpool:leader") or b"").startswith(b"1 "), timeout=10)
        assert wait_for(lambda: r.hlen("kvpool:blocks") == 3, timeout=10)      # written again
        time.sleep(4)                                    # more than a lease TTL: the standby waited
        assert (r.get("kvpool:leader") or b"").decode() == f"1 {a.address}"
        assert "took over" not in b.log()
        out = bytearray(3 * SMALL.block_bytes)
        assert c.fetch(toks, out) == 3 and bytes(out) == data.tobytes()


def _quotas(address: str) -> dict[tuple[str, str], int]:
    with stubs(address) as (_, admin_stub):
        rows = admin_stub.Stats(common_pb2.StatsRequest(), timeout=5).tenants
    return {(t.tenant, t.tier): t.quota_bytes for t in rows if t.HasField("quota_bytes")}


def test_a_standby_that_takes_over_enforces_the_same_quotas(pool_procs, redis_server):
    import json

    from kvpool.errors import PoolFull

    block = SMALL.block_bytes
    master, node = pool_procs
    a = master("--redis", redis_server.url, "--quotas", f"alice:dram={4 * block}", ready=r"ready grpc=(\S+)")
    b = master("--redis", redis_server.url, ready=r"standby grpc=(\S+)")          # no --quotas of its own
    later = free_port()                                                        # a third master, started later
    node(f"{a.address},{b.address},127.0.0.1:{later}", "node-a")
    assert wait_for(lambda: node_count(a.address) == 1, timeout=15)
    r = redis_server.client()
    assert wait_for(lambda: r.hget("kvpool:tenants", "alice") is not None, timeout=10)
    assert json.loads(r.hget("kvpool:tenants", "alice")) == {"quotas": {"dram": 4 * block}}
    a.kill()
    assert b.wait_log(r"took over with fencing epoch 2", timeout=20)
    assert wait_for(lambda: node_count(b.address) == 1, timeout=15)
    assert _quotas(b.address) == {("alice", "dram"): 4 * block}
    alice, bob = fresh_namespace(tenant="alice"), fresh_namespace(tenant="bob")
    with Client(b.address, alice) as c:
        with pytest.raises(PoolFull, match=rf"quota exceeded: 'alice' may hold {4 * block} bytes in dram"):
            c.publish(list(range(16 * 5)), random_blocks(5, seed=1))          # more than her quota at once
        c.publish(list(range(16 * 4)), random_blocks(4, seed=2))              # within it
    with Client(b.address, bob) as c:                                          # bob has no quota
        c.publish(list(range(16 * 5)), random_blocks(5, seed=3))
    # A master given --quotas makes them the pool's when it takes over (here: raised for alice).
    c3 = master("--redis", redis_server.url, "--quotas", f"alice:dram={8 * block}", port=later,
                ready=r"standby grpc=(\S+)")
    b.kill()
    assert c3.wait_log(r"took over with fencing epoch 3", timeout=20)
    assert wait_for(lambda: json.loads(r.hget("kvpool:tenants", "alice")) == {"quotas": {"dram": 8 * block}},
                    timeout=10)
    assert _quotas(c3.address) == {("alice", "dram"): 8 * block}
    assert wait_for(lambda: node_count(c3.address) == 1, timeout=15)
    with Client(c3.address, alice) as c:
        c.publish(list(range(1000, 1000 + 16 * 5)), random_blocks(5, seed=4))  # 5 blocks fit now


def test_admin_drain_and_top_follow_the_leader_of_a_master_list(pool_procs, redis_server):
    """`kvpool admin --address STANDBY,LEADER drain|top` talk to the leader, as every other
    admin command does: a standby would refuse them."""
    master, node = pool_procs
    a, b = two_masters(master, redis_server.url)
    node(f"{a.address},{b.address}", "node-a")
    assert wait_for(lambda: node_count(a.address) == 1, timeout=15)
    both = f"{b.address},{a.address}"                    # the standby first
    top = admin(both, "--json", "top", "--count", "1", "--interval", "0.2")
    assert top.returncode == 0, top.stderr
    assert [t["node"] for t in json.loads(top.stdout.splitlines()[-1])["tiers"]] == ["node-a"]
    drain = admin(both, "--json", "drain", "node-a")
    assert drain.returncode == 0, drain.stderr
    assert json.loads(drain.stdout)["draining"] is True
    resume = admin(both, "--json", "drain", "node-a", "--resume")
    assert resume.returncode == 0, resume.stderr
    assert json.loads(resume.stdout)["node"] == "node-a" and json.loads(resume.stdout)["draining"] is False
