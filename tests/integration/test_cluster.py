"""`kvpool master` and `kvpool node` as separate processes (docs/design.md §1).

Clients talk to the master; bytes go straight to the node. Either process can die and
come back: what the node holds on NVMe is served again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kvpool import Client, errors
from kvpool.rpc.v1 import admin_pb2, common_pb2
from tests.conftest import start_kvpool
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, wait_for
from tests.integration.rpc_helpers import stubs

HEARTBEAT = "0.2"


class Proc:
    def __init__(self, proc, lines):
        self.proc, self.lines = proc, lines

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=20)

    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def cluster(tmp_path):
    started: list[Proc] = []
    shm: list[str] = []

    def master(port: int = 0) -> tuple[Proc, str]:
        proc, m, lines = start_kvpool(["master", "--port", str(port), "--metrics-port", "-1",
                                       "--heartbeat-interval", HEARTBEAT], r"ready grpc=(\S+)")
        started.append(Proc(proc, lines))
        return started[-1], m.group(1)

    def node(master_address: str, name: str = "node-a", *args: str) -> Proc:
        proc, m, lines = start_kvpool(["node", "--master", master_address, "--port", "0", "--node-name", name,
                                       "--data-dir", str(tmp_path / name), *args], r"ready control=\S+ .*shm=(\S+)")
        started.append(Proc(proc, lines))
        shm.append(m.group(1))
        return started[-1]

    yield master, node
    for p in started:
        p.kill()
    for path in shm:
        if os.path.exists(path):
            os.unlink(path)


def stats(address: str) -> common_pb2.StatsResponse:
    with stubs(address) as (_, admin):
        return admin.Stats(common_pb2.StatsRequest())


def registered(address: str, count: int = 1) -> bool:
    return wait_for(lambda: stats(address).nodes == count, timeout=15)


def test_master_and_node_processes_serve_clients(cluster):
    master, node = cluster
    _, address = master()
    node(address)
    assert registered(address)
    ns = fresh_namespace()
    toks = list(range(16 * 4))
    data = random_blocks(4)
    with Client(address, ns) as c:
        assert c.publish(toks, data).written == 4
        assert c.match(toks) == 4
        out = bytearray(4 * SMALL.block_bytes)
        assert c.fetch(toks, out) == 4 and bytes(out) == data.tobytes()
    s = stats(address)
    assert s.blocks == 4 and s.tiers[0].tier == "dram" and s.tiers[0].used_bytes == 4 * SMALL.block_bytes
    assert s.tiers[0].node_name == "node-a"
    r = subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", address, "nodes"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "node-a" in r.stdout and "s ago" in r.stdout


def test_two_nodes_share_the_load(cluster):
    master, node = cluster
    _, address = master()
    node(address, "node-a")
    node(address, "node-b")
    assert registered(address, 2)
    ns = fresh_namespace()
    with Client(address, ns) as c:
        for i in range(6):
            keys = [os.urandom(16) for _ in range(4)]
            c.put_blocks(keys, random_blocks(4, seed=i))
            assert [bytes(b) for b in c.get_blocks(keys)] == [d.tobytes() for d in random_blocks(4, seed=i)]
    used = [t.used_bytes for t in stats(address).tiers]
    assert len(used) == 2 and all(u > 0 for u in used)   # placement used both nodes


def test_node_restart_serves_its_nvme_blocks_again(cluster):
    master, node = cluster
    m, address = master()
    n = node(address, "node-a", "--nvme", "16MiB")
    assert registered(address)
    ns = fresh_namespace()
    toks = list(range(16 * 5))
    data = random_blocks(5, seed=2)
    with Client(address, ns) as c:
        c.publish(toks, data)
    with stubs(address) as (_, admin):
        assert admin.Evict(admin_pb2.EvictRequest(all=True), timeout=30).blocks == 5   # demoted to NVMe
    n.kill()
    node(address, "node-a", "--nvme", "16MiB")                       # same name, same data dir
    # The new incarnation replaces the old one, whose DRAM is gone, and brings its NVMe back.
    assert wait_for(lambda: "registered again (restarted)" in m.log() or "missed" in m.log(), timeout=15)
    with Client(address, ns) as c:
        assert wait_for(lambda: c.match(toks) == 5, timeout=15)
        out = bytearray(5 * SMALL.block_bytes)
        assert c.fetch(toks, out) == 5 and bytes(out) == data.tobytes()


def test_master_restart_node_registers_again(cluster):
    master, node = cluster
    m, address = master()
    port = int(address.rsplit(":", 1)[1])
    n = node(address, "node-a", "--nvme", "16MiB")
    assert registered(address)
    ns = fresh_namespace()
    toks = list(range(16 * 3))
    data = random_blocks(3, seed=4)
    with Client(address, ns) as c:
        c.publish(toks, data)
    with stubs(address) as (_, admin):
        admin.Evict(admin_pb2.EvictRequest(all=True), timeout=30)
    m.kill()
    m2, address2 = master(port)                                      # a new master, same address
    assert address2 == address
    assert registered(address)                                       # the node's heartbeat found it
    with Client(address, ns) as c:
        assert wait_for(lambda: c.match(toks) == 3, timeout=15)
        out = bytearray(3 * SMALL.block_bytes)
        assert c.fetch(toks, out) == 3 and bytes(out) == data.tobytes()
    assert n.log().count("registered with master") >= 2


def test_dead_node_is_forgotten(cluster):
    master, node = cluster
    _, address = master()
    n = node(address)
    assert registered(address)
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(2)]
    with Client(address, ns) as c:
        c.put_blocks(keys, random_blocks(2))
        n.kill()
        assert wait_for(lambda: stats(address).nodes == 0, timeout=15)   # 5 missed heartbeats
        assert c.lookup(keys) == 0
        with pytest.raises(errors.PoolFull, match="no storage node"):
            c.put_blocks(keys, random_blocks(2))


def test_node_waits_for_its_master(cluster, tmp_path):
    master, node = cluster
    # A node started before its master keeps trying, and joins once the master is up.
    probe, address = master()
    port = int(address.rsplit(":", 1)[1])
    probe.kill()
    n = node(address)
    _, address2 = master(port)
    assert registered(address2)
    assert "unreachable" in n.log()
