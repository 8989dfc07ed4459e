"""Replicas across hosts (``kvpool master --replicas 2``), on network-namespace hosts.

The writer on host a puts its blocks on node A (its own host). The master has node B, on
host b, pull a copy from node A's data server (node to node: never through the master or
the writer). After ``kill -9`` of node A, every block is still readable, bytes verified, by
a reader on host c, which has no node and so reads over the network. Before that, a reader on
host b is sent to the copy on its own host.
"""

from __future__ import annotations

import os
import time

from tests.hosts import hosts  # noqa: F401  (the fixture)
from tests.integration.test_multihost import HEARTBEAT, run_client


def test_replicas_2_every_block_survives_kill_9_of_a_node(hosts):
    h = hosts(["a", "b", "c"])
    a, b, c = h["a"], h["b"], h["c"]
    _, m, master_log = c.start_kvpool(["master", "--host", c.address, "--insecure", "--port", "0", "--metrics-port", "-1",
                                       "--heartbeat-interval", HEARTBEAT, "--replicas", "2"], r"ready grpc=(\S+)")
    master = m.group(1)
    nodes = {}
    for host, name in ((a, "node-a"), (b, "node-b")):
        nodes[name], _, _ = host.start_kvpool(
            ["node", "--master", master, "--host", host.address, "--insecure", "--port", "0", "--node-name", name,
             "--prefault", "false", "--data-dir", f"/tmp/kvpool-test-{os.getpid()}-{name}"],
            r"ready control=\S+ data=(\S+)")
    deadline = time.monotonic() + 20
    while run_client(a, "stats", master)["nodes"] != 2:
        assert time.monotonic() < deadline, "nodes did not register"
        time.sleep(0.2)
    assert run_client(a, "publish", master, 1, 6)["written"] == 6
    # Node B holds a copy of each block within a sweep or two.
    deadline = time.monotonic() + 15
    while True:
        used = {t["node"]: t["used"] for t in run_client(a, "stats", master)["tiers"]}
        if used == {"node-a": 6 * 16384, "node-b": 6 * 16384}:
            break
        assert time.monotonic() < deadline, f"no replicas on node B: {used}"
        time.sleep(0.3)
    # A reader on host b is sent to the replica on its own host: shared memory, no network.
    got = run_client(b, "fetch", master, 1, 6)
    assert got["hit"] == 6 and got["ok"] and set(got["kinds"].values()) == {"shm"}, got
    nodes["node-a"].kill()                                        # SIGKILL: its memory is gone
    nodes["node-a"].wait(timeout=10)
    deadline = time.monotonic() + 20
    while run_client(c, "stats", master)["nodes"] != 1:          # the master forgets node A
        assert time.monotonic() < deadline, "node A was not forgotten"
        time.sleep(0.3)
    got = run_client(c, "fetch", master, 1, 6)
    assert got["hit"] == 6 and got["ok"], got                      # every block, right bytes, from B
    assert set(got["kinds"].values()) == {"tcp"}
