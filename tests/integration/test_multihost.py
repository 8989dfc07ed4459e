"""A pool across hosts: the master and two nodes on two network-namespace hosts (tests/hosts.py).

Host a runs node A and a writer; host b runs node B and a reader; host c runs the master (and
a client with no node of its own). The hosts have
different hostnames, so nothing on b can use a's shared memory: every byte between them
crosses the (virtual) network, through the nodes' data servers.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from tests.hosts import hosts  # noqa: F401  (the fixture)

CLIENT = os.path.join(os.path.dirname(__file__), "remote_client.py")
HEARTBEAT = "0.5"  # a node is forgotten after 5 missed: 2.5 s, enough on a busy 2-core machine


def run_client(host, *args, timeout: float = 60) -> dict:
    r = host.run([sys.executable, CLIENT, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


class Cluster:
    """Node A on host a, node B on host b, the master on host c."""

    def __init__(self, hosts_fixture, node_a_args: tuple[str, ...] = (), node_args: tuple[str, ...] = ()) -> None:
        h = hosts_fixture(["a", "b", "c"])
        self.a, self.b, self.c = h["a"], h["b"], h["c"]  # host c has no node: a client alone
        self.master_proc, m, self.master_log = self.c.start_kvpool(
            ["master", "--host", self.c.address, "--insecure", "--port", "0", "--metrics-port", "-1",
             "--heartbeat-interval", HEARTBEAT], r"ready grpc=(\S+)")
        self.master = m.group(1)
        self.node_a = self._node(self.a, "node-a", *node_args, *node_a_args)
        self.node_b = self._node(self.b, "node-b", *node_args)
        deadline = time.monotonic() + 20
        while run_client(self.a, "stats", self.master)["nodes"] != 2:
            assert time.monotonic() < deadline, "nodes did not register"
            time.sleep(0.2)

    def _node(self, host, name: str, *args: str):
        proc, m, lines = host.start_kvpool(
            ["node", "--master", self.master, "--host", host.address, "--insecure", "--port", "0", "--node-name", name,
             "--prefault", "false", "--data-dir", f"/tmp/kvpool-test-{os.getpid()}-{name}", *args],
            r"ready control=\S+ data=(\S+)")
        assert m.group(1).startswith(host.address + ":")
        return proc

    def used(self) -> dict[str, int]:
        return {t["node"]: t["used"] for t in run_client(self.a, "stats", self.master)["tiers"]}


def test_reader_on_another_host_pulls_over_tcp(hosts):
    c = Cluster(hosts)
    # The writer's blocks go to the node on its own host (host-aware placement).
    assert run_client(c.a, "publish", c.master, 1, 6)["written"] == 6
    assert c.used() == {"node-a": 6 * 16384, "node-b": 0}
    # The reader on host b cannot map node A's memory: it pulls over TCP, bytes verified.
    got = run_client(c.b, "fetch", c.master, 1, 6)
    assert got["hit"] == 6 and got["ok"] and set(got["kinds"].values()) == {"tcp"}
    # The reader's own blocks stay on its host; the writer on a reads them over TCP in turn.
    assert run_client(c.b, "publish", c.master, 2, 3)["written"] == 3
    assert c.used()["node-b"] == 3 * 16384
    got = run_client(c.a, "fetch", c.master, 2, 3)
    assert got["hit"] == 3 and got["ok"] and set(got["kinds"].values()) == {"tcp"}
    # One prompt whose first half is on node A and second half on node B: a reader on host c
    # pulls from both nodes in one fetch, each share under its own node's capability.
    assert run_client(c.a, "publish", c.master, 8, 3)["written"] == 3
    got = run_client(c.b, "publish", c.master, 8, 6)
    assert (got["written"], got["present"]) == (3, 3), got
    got = run_client(c.c, "fetch", c.master, 8, 6)
    assert got["hit"] == 6 and got["ok"] and len(got["kinds"]) == 2, got


def test_reader_on_another_host_pulls_over_ucx(hosts):
    c = Cluster(hosts, node_args=("--ucx", "true"))
    assert run_client(c.a, "publish", c.master, 6, 6)["written"] == 6
    assert c.used()["node-a"] == 6 * 16384
    got = run_client(c.b, "fetch", c.master, 6, 6, "--transport", "ucx")
    assert got["hit"] == 6 and got["ok"] and set(got["kinds"].values()) == {"ucx"}, got
    # Unforced, the client asks UCX how it would reach the node: these hosts share a kernel,
    # so UCX finds CMA, which is one-sided, and the client prefers it to TCP.
    got = run_client(c.b, "fetch", c.master, 6, 6)
    assert got["ok"] and set(got["kinds"].values()) == {"ucx"}, got
    # And the other way: a writer forced onto UCX puts into a node on another host.
    assert run_client(c.c, "publish", c.master, 7, 3, "--transport", "ucx")["written"] == 3
    got = run_client(c.b, "fetch", c.master, 7, 3)
    assert got["hit"] == 3 and got["ok"], got


def wait_reading(reader) -> None:
    """Block until the streaming reader has made its first good read (it says so on stdout)."""
    line = reader.stdout.readline()
    assert '"reading"' in line, (line, reader.stderr.read() if reader.poll() is not None else "")


def test_killed_node_never_yields_wrong_bytes(hosts):
    c = Cluster(hosts)
    assert run_client(c.a, "publish", c.master, 3, 8)["written"] == 8
    reader = c.b.popen([sys.executable, CLIENT, "stream", c.master, "3", "8", "6"], stdout=-1, stderr=-1, text=True)
    wait_reading(reader)
    c.node_a.send_signal(signal.SIGKILL)
    out, err = reader.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["good"] > 0, (result, err)
    assert result["wrong"] == 0, result
    # After the kill the reader is told: the node is unavailable mid-transfer, or, once the
    # master has forgotten it, the blocks are simply gone (a miss).
    assert result["errors"] or result["misses"], result
    for message in result["messages"]:
        assert "node 'node-a'" in message, message
    assert result["max_error_s"] < 10, result   # bounded by the client's timeouts


def test_partitioned_node_times_out_and_names_itself(hosts):
    c = Cluster(hosts)
    assert run_client(c.a, "publish", c.master, 5, 8)["written"] == 8
    reader = c.b.popen([sys.executable, CLIENT, "stream", c.master, "5", "8", "12"], stdout=-1, stderr=-1, text=True)
    wait_reading(reader)
    c.a.network.cut("a")  # node A's cable: packets vanish, connections stall
    out, err = reader.communicate(timeout=90)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["good"] > 0 and result["wrong"] == 0, (result, err)
    assert result["errors"].get("Unavailable"), result
    assert any("node 'node-a'" in m and ("timed out" in m or "within" in m) for m in result["messages"]), result
    # io_timeout (3 s) and connect_timeout (2 s) of remote_client.py bound every wait.
    assert result["max_error_s"] < 6, result


def test_writer_whose_node_died_is_placed_elsewhere(hosts):
    # Node A has the most room, so a writer on host c (no node of its own) is sent there.
    c = Cluster(hosts, node_a_args=("--dram", "128MiB"))
    c.node_a.send_signal(signal.SIGKILL)
    c.node_a.wait(timeout=10)
    # The master has not noticed yet (heartbeats), so the grant points at node A: the writer
    # cannot reach it, aborts, and its retry skips node A.
    got = run_client(c.c, "publish", c.master, 4, 4)
    assert got.get("written") == 4, got
    assert c.used().get("node-b") == 4 * 16384
    assert run_client(c.b, "fetch", c.master, 4, 4)["ok"]
