"""A master with Redis metadata (``kvpool master --redis``), against a real redis-server.

* ``--redis-commit wait``: a commit is answered after Redis has it, so a master killed right
  after a commit (before its node heard of the block) loses nothing: the next master
  reconciles Redis with the node, which confirms the bytes.
* ``--redis-commit sent`` (the default): a commit is answered once its write is in the
  kernel's socket buffer; a master killed with its writes unanswered (Redis stopped) loses
  nothing either. A write Redis refuses as fenced fails the commit under ``wait``.
* ``--redis-commit background``: a backlog past ``--redis-backlog`` holds commits back until
  the writer catches up.
* Redis down or restarted: the pool keeps serving from memory, says so in Stats, health
  and metrics, and writes everything again once Redis is back.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpool import Client
from kvpool.rpc.v1 import common_pb2
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, wait_for
from tests.integration.pool_procs import pool_procs  # noqa: F401  (fixture)
from tests.integration.redis_server import redis_server  # noqa: F401  (fixture)
from tests.integration.rpc_helpers import stubs


def stats(address: str) -> common_pb2.StatsResponse:
    with stubs(address) as (_, admin):
        return admin.Stats(common_pb2.StatsRequest(), timeout=10)


def metadata_health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kvpool.metadata"),
                                                    timeout=5).status


def test_kill_9_right_after_commits_loses_nothing(pool_procs, redis_server):
    master, node = pool_procs
    m = master("--redis", redis_server.url, "--redis-commit", "wait")
    port = int(m.address.rsplit(":", 1)[1])
    n = node(m.address, "node-a")
    assert wait_for(lambda: stats(m.address).nodes == 1, timeout=15)
    ns = fresh_namespace()
    toks = list(range(16 * 6))
    data = random_blocks(6, seed=3)
    with Client(m.address, ns) as c:
        c.publish(toks, data)
    m.kill()                                   # at once: the node may not have heard of the commit
    r = redis_server.client()
    assert r.hlen("kvpool:blocks") == 6 and r.hlen("kvpool:namespaces") == 1
    m2 = master("--redis", redis_server.url, port=port)
    assert m2.wait_log(r"took over with fencing epoch 2")
    with Client(m2.address, ns) as c:
        assert wait_for(lambda: c.match(toks) == 6, timeout=15)
        out = bytearray(6 * SMALL.block_bytes)
        assert c.fetch(toks, out) == 6 and bytes(out) == data.tobytes()
    s = stats(m2.address)
    assert s.metadata_store.startswith("redis up") and s.fencing_epoch == 2 and not s.metadata_degraded
    assert "registered with master" in n.log()


def test_redis_down_and_restarted_pool_serves_from_memory_and_catches_up(pool_procs, redis_server):
    master, node = pool_procs
    m = master("--redis", redis_server.url, "--metrics-port", "0", ready=r"ready grpc=(\S+) metrics=(\S+)")
    metrics_url = m.wait_log(r"ready grpc=\S+ metrics=(\S+)").group(1)
    node(m.address, "node-a")
    assert wait_for(lambda: stats(m.address).nodes == 1, timeout=15)
    ns = fresh_namespace()
    first, second = list(range(16 * 3)), list(range(500, 500 + 16 * 4))
    d1, d2 = random_blocks(3, seed=5), random_blocks(4, seed=6)
    with Client(m.address, ns) as c:
        c.publish(first, d1)
        redis_server.kill()                                          # Redis is gone
        c.publish(second, d2)                                        # commits do not wait for it
        assert wait_for(lambda: stats(m.address).metadata_degraded, timeout=10)
        s = stats(m.address)
        assert s.metadata_store.startswith("redis down") and "serving from memory" in s.metadata_store
        assert wait_for(lambda: metadata_health(m.address) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
        assert health_pb2.HealthCheckResponse.SERVING == _pool_health(m.address)   # the pool itself serves
        assert "kvpool_metadata_store_up 0.0" in _scrape(metrics_url)
        out = bytearray(4 * SMALL.block_bytes)                       # reads never needed Redis
        assert c.fetch(second, out) == 4 and bytes(out) == d2.tobytes()
        redis_server.start()                                         # back, empty (no persistence)
        assert wait_for(lambda: not stats(m.address).metadata_degraded, timeout=15)
        r = redis_server.client()
        assert wait_for(lambda: r.hlen("kvpool:blocks") == 7, timeout=10)   # the whole index, written again
        assert r.hlen("kvpool:namespaces") == 1
        assert wait_for(lambda: metadata_health(m.address) == health_pb2.HealthCheckResponse.SERVING, timeout=5)
        assert "kvpool_metadata_store_up 1.0" in _scrape(metrics_url)
        out = bytearray(3 * SMALL.block_bytes)
        assert c.fetch(first, out) == 3 and bytes(out) == d1.tobytes()


def _pool_health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_bad_redis_url_and_a_node_from_a_newer_epoch_are_refused(pool_procs, redis_server, tmp_path):
    import subprocess
    import sys

    from kvpool.rpc.v1 import node_pb2, node_pb2_grpc

    for flags, says in ((["--redis", "127.0.0.1:6379"], "give a URL such as redis://127.0.0.1:6379/0"),
                        (["--redis", redis_server.url, "--redis-backlog", "0"], "allow at least one unwritten change"),
                        (["--redis", redis_server.url, "--redis-commit", "later"], "choose from 'sent', 'wait', 'background'")):
        res = subprocess.run([sys.executable, "-m", "kvpool", "master", "--port", "0", "--metrics-port", "-1", *flags],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and says in res.stderr, res.stderr
    master, _ = pool_procs
    m = master("--redis", redis_server.url, ready=r"ready grpc=(\S+)")
    with grpc.insecure_channel(m.address) as ch:
        registry = node_pb2_grpc.RegistryStub(ch)
        try:
            registry.RegisterNode(node_pb2.RegisterNodeRequest(name="n", control_address="127.0.0.1:1", epoch=7,
                                                               incarnation="x"), timeout=10)
            raise AssertionError("a node from a newer epoch was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "epoch 1 is older than the epoch 7" in exc.details()
    assert stats(m.address).fencing_epoch == 1            # still leading, still serving


def _gauge(url: str, name: str) -> float:
    import re

    return float(re.search(rf"^{name}(?:_total)? (\S+)$", _scrape(url), re.M).group(1))


def test_commits_answered_while_redis_stalls_survive_a_kill_9(pool_procs, redis_server):
    """The default (``--redis-commit sent``): a commit is answered once its write is in the
    kernel's socket buffer, not after Redis's reply. With Redis and the node stopped, commits
    are answered at once; the master is killed with 16 writes (about 70 KB) unanswered; the
    kernel still delivers them and Redis runs them all (the write connection gets no replies,
    so Redis has none to fail on and reads it to its end), so the next master serves every
    block: Redis has them, the node confirms them."""
    import signal
    import time

    master, node = pool_procs
    m = master("--redis", redis_server.url, "--metrics-port", "0", ready=r"ready grpc=(\S+) metrics=(\S+)")
    metrics_url = m.wait_log(r"ready grpc=\S+ metrics=(\S+)").group(1)
    port = int(m.address.rsplit(":", 1)[1])
    n = node(m.address, "node-a", "--dram", "64MiB")
    assert wait_for(lambda: stats(m.address).nodes == 1, timeout=15)
    ns = fresh_namespace()
    old, d_old = list(range(16 * 2)), random_blocks(2, seed=7)
    batches = [(list(range(1000 + 1000 * i, 1000 + 1000 * i + 16 * 32)), random_blocks(32, seed=8 + i))
               for i in range(16)]
    r = redis_server.client()
    with Client(m.address, ns) as c:
        c.publish(old, d_old)
        assert wait_for(lambda: r.hlen("kvpool:blocks") == 2, timeout=10)
        n.kill(signal.SIGSTOP)                 # the node hears of nothing from here on
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            for toks, data in batches:         # each commit's write is in the kernel, unanswered
                c.publish(toks, data)
            assert time.monotonic() - started < 1.5, "commits waited for a stopped Redis"
            assert _gauge(metrics_url, "kvpool_metadata_backlog") == 16 * 32   # sent, not acknowledged
            m.kill()
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
    n.kill(signal.SIGCONT)
    assert wait_for(lambda: r.hlen("kvpool:blocks") == 2 + 16 * 32, timeout=10), r.hlen("kvpool:blocks")
    m2 = master("--redis", redis_server.url, port=port)
    assert m2.wait_log(r"took over with fencing epoch 2")
    with Client(m2.address, ns) as c:
        assert wait_for(lambda: c.match(batches[-1][0]) == 32, timeout=15)    # in Redis, confirmed by the node
        out = bytearray(32 * SMALL.block_bytes)
        for toks, data in [(old, d_old)] + batches:
            got = c.fetch(toks, out)
            assert got == len(data) and bytes(out[:got * SMALL.block_bytes]) == data.tobytes()


def test_a_write_refused_as_fenced(pool_procs, redis_server):
    """Redis holds a newer epoch than the leader's (another master took over): ``wait`` fails
    the commit with UNAVAILABLE, since Redis never took it; ``sent`` answered it already, and
    the master says how many blocks that left unknown to any master. Both step down."""
    from kvpool.errors import Unavailable

    master, node = pool_procs
    r = redis_server.client()
    for mode in ("wait", "sent"):
        prefix = f"fenced-{mode}"
        # A long lease: its renewal (every third of it) does not notice the new epoch first.
        m = master("--redis", redis_server.url, "--redis-prefix", prefix, "--redis-commit", mode, "--leader-ttl", "30")
        node(m.address, f"node-{mode}")
        assert wait_for(lambda: stats(m.address).nodes == 1, timeout=15)
        ns = fresh_namespace()
        with Client(m.address, ns) as c:
            c.publish(list(range(16)), random_blocks(1, seed=20))
            assert wait_for(lambda: r.hlen(f"{prefix}:blocks") == 1, timeout=10)
            r.set(f"{prefix}:epoch", 99)                            # as a master that took over would
            if mode == "wait":
                try:  # the client retries the put; the master refuses it by then (deposed)
                    c.publish(list(range(100, 116)), random_blocks(1, seed=21))
                except Unavailable:
                    pass
                else:
                    raise AssertionError("a commit Redis refused as fenced was answered under --redis-commit wait")
            else:
                c.publish(list(range(100, 116)), random_blocks(1, seed=21))
                assert m.wait_log(r"refused a write as fenced after its commits were answered: 1 blocks")
        assert m.wait_log(r"deposed \(epoch 1\)")
        assert r.hlen(f"{prefix}:blocks") == 1                      # Redis took nothing from a deposed master


def test_backlog_past_its_bound_holds_commits_until_redis_catches_up(pool_procs, redis_server):
    import signal
    import threading
    import time

    master, node = pool_procs
    m = master("--redis", redis_server.url, "--redis-commit", "background", "--redis-backlog", "3",
               "--metrics-port", "0", ready=r"ready grpc=(\S+) metrics=(\S+)")
    metrics_url = m.wait_log(r"ready grpc=\S+ metrics=(\S+)").group(1)
    node(m.address, "node-a")
    assert wait_for(lambda: stats(m.address).nodes == 1, timeout=15)
    ns = fresh_namespace()
    a, b = list(range(16 * 2)), list(range(1000, 1000 + 16 * 4))
    d_a, d_b = random_blocks(2, seed=10), random_blocks(4, seed=11)
    r = redis_server.client()
    with Client(m.address, ns) as c:
        c.publish(list(range(5000, 5016)), random_blocks(1, seed=12))
        assert wait_for(lambda: r.hlen("kvpool:blocks") == 1, timeout=10)
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            c.publish(a, d_a)                  # within the bound: answered at once
            done = threading.Event()
            t = threading.Thread(target=lambda: (c.publish(b, d_b), done.set()), daemon=True)
            t.start()                          # 4 changes > --redis-backlog 3: held back
            assert not done.wait(0.7), "a commit past the backlog bound did not wait"
            assert _gauge(metrics_url, "kvpool_metadata_backpressured") >= 1
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert done.wait(5), "the held commit was not answered once Redis caught up"
        t.join(5)
        assert not stats(m.address).metadata_degraded     # released by the flush, not by a timeout
        assert wait_for(lambda: r.hlen("kvpool:blocks") == 7, timeout=10)
        out = bytearray(4 * SMALL.block_bytes)
        assert c.fetch(b, out) == 4 and bytes(out) == d_b.tobytes()
        # A Redis that stays silent is declared down (2 s socket timeout): the wait ends there.
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            c.publish(list(range(3000, 3000 + 16 * 2)), random_blocks(2, seed=13))
            started = time.monotonic()
            c.publish(list(range(4000, 4000 + 16 * 4)), random_blocks(4, seed=14))
            held = time.monotonic() - started
            assert 0.5 < held < 6, f"held {held:.1f}s"
            assert stats(m.address).metadata_degraded
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: not stats(m.address).metadata_degraded, timeout=15)
        assert wait_for(lambda: r.hlen("kvpool:blocks") == 13, timeout=10)   # caught up


def test_writes_cut_off_in_flight_go_again(pool_procs, redis_server):
    """Redis holds the writer's calls (``CLIENT PAUSE … WRITE``), and its connections are
    killed before it runs them: a commit and a removal that were sent, unacknowledged, are
    lost in Redis. The master sees the connection fail, reconnects, and writes both again:
    Redis ends up with the new block and without the removed one."""
    master, node = pool_procs
    m = master("--redis", redis_server.url)
    node(m.address, "node-a")
    assert wait_for(lambda: stats(m.address).nodes == 1, timeout=15)
    ns = fresh_namespace()
    a, b = list(range(16 * 2)), list(range(1000, 1000 + 16 * 2))
    r = redis_server.client()
    with Client(m.address, ns) as c:
        c.publish(a, random_blocks(2, seed=30))
        assert wait_for(lambda: r.hlen("kvpool:blocks") == 2, timeout=10)
        r.client_pause(1500, all=False)                 # writes wait in Redis, unread
        c.publish(b, random_blocks(2, seed=31))         # answered: its call is in the kernel
        assert c.remove(ns.keys(a)) == 2
        writers = [cl["id"] for cl in r.client_list() if cl["name"] in ("kvpool-writer", "kvpool-acks")]
        assert len(writers) == 2
        for client_id in writers:
            r.client_kill_filter(_id=client_id)         # the calls die with the connection
        assert wait_for(lambda: set(r.hkeys("kvpool:blocks")) == set(ns.keys(b)), timeout=15), r.hkeys("kvpool:blocks")
        assert wait_for(lambda: not stats(m.address).metadata_degraded, timeout=10)
        assert m.wait_log(r"unavailable \(ConnectionError")
