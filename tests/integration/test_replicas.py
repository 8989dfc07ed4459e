"""Replicas across hosts (``kvpool master --replicas 2``), on network-namespace hosts.

The writer on host a puts its blocks on node A (its own host). The master has node B, on
host b, pull a copy from node A's data server (node to node: never through the master or
the writer). After ``kill -9`` of node A, every block is still readable, bytes verified, by
a reader on host c, which has no node and so reads over the network. Before that, a reader on
host b is sent to the copy on its own host.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time

from tests.hosts import hosts  # noqa: F401  (the fixture)
from tests.integration.test_multihost import HEARTBEAT, run_client


BLOCK = 16384  # tests.integration.helpers.SMALL


def start_master(c, *master_args: str, port: str = "0"):
    """``kvpool master`` on host ``c``; returns (process, address)."""
    proc, m, _ = c.start_kvpool(["master", "--host", c.address, "--insecure", "--port", port, "--metrics-port", "-1",
                                 "--heartbeat-interval", HEARTBEAT, *master_args], r"ready grpc=(\S+)")
    return proc, m.group(1)


def wait_nodes(host, master, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while run_client(host, "stats", master)["nodes"] != n:
        assert time.monotonic() < deadline, f"the master does not list {n} nodes"
        time.sleep(0.2)


def start_pool(hosts, *master_args: str, node_args: tuple[str, ...] = ()):
    """Node A on host a, node B on host b, the master on host c; returns (hosts, master, nodes)
    (``nodes`` also holds the master's process, as "master")."""
    h = hosts(["a", "b", "c"])
    a, b, c = h["a"], h["b"], h["c"]
    master_proc, master = start_master(c, *master_args)
    nodes = {}
    for host, name in ((a, "node-a"), (b, "node-b")):
        nodes[name], _, _ = host.start_kvpool(
            ["node", "--master", master, "--host", host.address, "--insecure", "--port", "0", "--node-name", name,
             "--prefault", "false", "--data-dir", f"/tmp/kvpool-test-{os.getpid()}-{name}", *node_args],
            r"ready control=\S+ data=(\S+)")
    wait_nodes(a, master, 2)
    nodes["master"] = master_proc
    return (a, b, c), master, nodes


def wait_used(host, master, want: dict, timeout: float = 15) -> None:
    """Wait until the DRAM used on each node is ``want`` (node name -> blocks)."""
    deadline = time.monotonic() + timeout
    while True:
        used = {t["node"]: t["used"] // BLOCK for t in run_client(host, "stats", master)["tiers"]}
        if used == want:
            return
        assert time.monotonic() < deadline, f"blocks per node {used}, expected {want}"
        time.sleep(0.3)


def admin(host, master, *args: str) -> dict:
    """``kvpool admin ... --json`` as an operator types it, on ``host``."""
    r = host.run([sys.executable, "-m", "kvpool", "admin", *args, "--address", master, "--json"],
                 capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_replicas_2_every_block_survives_kill_9_of_a_node(hosts):
    (a, b, c), master, nodes = start_pool(hosts, "--replicas", "2")
    assert run_client(a, "publish", master, 1, 6)["written"] == 6
    wait_used(a, master, {"node-a": 6, "node-b": 6})  # node B holds a copy of each block within a sweep or two
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


def test_a_namespace_setting_overrides_the_pool_default(hosts):
    """Pool default 2: a namespace with replicas=1 is never copied (and its blocks go with
    their node); pool default 1: a namespace with replicas=2 is, and `kvpool admin namespaces
    --set-replicas` changes a namespace's copies both ways."""
    (a, b, c), master, nodes = start_pool(hosts, "--replicas", "2")
    assert run_client(a, "publish", master, 1, 3)["written"] == 3                           # the default: 2
    assert run_client(a, "publish", master, 2, 4, "--model", "single", "--replicas", "1")["written"] == 4
    wait_used(c, master, {"node-a": 7, "node-b": 3})
    time.sleep(1.5)                                      # three more replication sweeps: still no copy
    wait_used(c, master, {"node-a": 7, "node-b": 3}, timeout=0)
    listed = {n["model"]: n for n in admin(c, master, "namespaces")["namespaces"]}
    assert (listed["single"]["replicas"], listed["single"]["replicas_default"]) == (1, False)
    assert (listed["multi-host-test"]["replicas"], listed["multi-host-test"]["replicas_default"]) == (2, True)
    nodes["node-a"].kill()
    nodes["node-a"].wait(timeout=10)
    deadline = time.monotonic() + 20
    while run_client(c, "stats", master)["nodes"] != 1:
        assert time.monotonic() < deadline, "node A was not forgotten"
        time.sleep(0.3)
    assert run_client(c, "fetch", master, 2, 4, "--model", "single")["hit"] == 0          # one copy: gone
    got = run_client(c, "fetch", master, 1, 3)
    assert got["hit"] == 3 and got["ok"], got


def test_replicas_set_per_namespace_on_a_pool_without_them(hosts):
    (a, b, c), master, _ = start_pool(hosts)                                                # default: 1
    assert run_client(a, "publish", master, 1, 3, "--model", "copied", "--replicas", "2")["written"] == 3
    assert run_client(a, "publish", master, 2, 4, "--model", "plain")["written"] == 4
    wait_used(c, master, {"node-a": 7, "node-b": 3})
    time.sleep(1.5)
    wait_used(c, master, {"node-a": 7, "node-b": 3}, timeout=0)
    ids = {n["model"]: n["namespace_id"] for n in admin(c, master, "namespaces")["namespaces"]}
    # An operator turns copies off for one namespace and on for the other.
    out = admin(c, master, "namespaces", "--namespace", ids["copied"], "--set-replicas", "1")
    assert [(n["replicas"], int(n["blocks"])) for n in out["namespaces"]] == [(1, 3)]
    wait_used(c, master, {"node-a": 7, "node-b": 0})
    admin(c, master, "namespaces", "--namespace", ids["plain"], "--set-replicas", "2")
    wait_used(c, master, {"node-a": 7, "node-b": 4})
    got = run_client(b, "fetch", master, 2, 4, "--model", "plain")                         # its own host's copy
    assert got["hit"] == 4 and got["ok"] and set(got["kinds"].values()) == {"shm"}, got


def test_a_block_read_often_from_another_host_gains_a_copy_there(hosts):
    (a, b, c), master, _ = start_pool(hosts, "--read-replicas", "1")                      # replicas: 1
    assert run_client(a, "publish", master, 1, 4)["written"] == 4
    time.sleep(1.0)
    wait_used(c, master, {"node-a": 4, "node-b": 0}, timeout=0)          # nobody read them yet: no copy
    got = run_client(b, "fetch", master, 1, 4)
    assert got["hit"] == 4 and got["ok"] and set(got["kinds"].values()) == {"tcp"}, got
    for _ in range(2):                                                    # READ_COPY_AFTER reads from host b
        assert run_client(b, "fetch", master, 1, 4)["ok"]
    wait_used(c, master, {"node-a": 4, "node-b": 4})
    got = run_client(b, "fetch", master, 1, 4)                            # now read on its own host
    assert got["hit"] == 4 and got["ok"] and set(got["kinds"].values()) == {"shm"}, got


def copies(host, master) -> dict:
    """``kvpool admin stats --json``: the index's copies per (node, tier), and the copies made."""
    s = admin(host, master, "stats")
    held = {(t["node_name"], t["tier"]): int(t["blocks"]) for t in s["tiers"]}
    return {"held": held, "replicated": int(s["replicated_blocks"])}


def wait_copies(host, master, want: dict, timeout: float = 20) -> dict:
    """Wait until the index holds ``want`` copies per (node, tier) (those named)."""
    deadline = time.monotonic() + timeout
    while True:
        now = copies(host, master)
        if all(now["held"].get(k, 0) == v for k, v in want.items()):
            return now
        assert time.monotonic() < deadline, f"copies per (node, tier) {now['held']}, expected {want}"
        time.sleep(0.3)


def test_a_replica_over_its_nodes_dram_watermark_goes_to_its_nvme_and_outlives_the_first_node(hosts, tmp_path):
    """Both nodes have DRAM (1 MiB: 64 blocks) and NVMe. Node B's DRAM, holding the replicas,
    fills past its watermark with blocks a writer on host b keeps there: B demotes its coldest
    copies, the replicas, to its own NVMe. After kill -9 of node A, every block is read from
    there (promoted on B, checksums verified), bytes verified by the reader."""
    node_args = ("--dram", "1MiB", "--slab-bytes", "256KiB", "--nvme", "4MiB", "--data-dir")
    (a, b, c), master, nodes = start_pool(hosts, "--replicas", "2", "--eviction-policy", "lru",
                                          node_args=(*node_args, str(tmp_path)))
    assert run_client(a, "publish", master, 1, 6)["written"] == 6
    wait_copies(c, master, {("node-a", "dram"): 6, ("node-b", "dram"): 6})
    for seed in (2, 3):                  # 58 more blocks on node B, copied nowhere: B's DRAM is full
        assert run_client(b, "publish", master, seed, 29, "--model", "local", "--replicas", "1")["written"] == 29
    # Down to the low watermark (90% of 64 slots): the 7 coldest go to B's NVMe, the 6 replicas first.
    got = wait_copies(c, master, {("node-b", "nvme"): 7, ("node-b", "dram"): 57, ("node-a", "dram"): 6})
    assert got["held"].get(("node-a", "nvme"), 0) == 0
    nodes["node-a"].kill()                                        # SIGKILL: its memory is gone
    nodes["node-a"].wait(timeout=10)
    wait_nodes(c, master, 1)
    got = run_client(c, "fetch", master, 1, 6)
    assert got["hit"] == 6 and got["ok"], got                      # every block, right bytes, from B's NVMe
    assert admin(c, master, "stats")["promoted_blocks"] == "6"


def test_replicas_are_adopted_back_after_kill_9_of_the_master(hosts, tmp_path):
    """No Redis. After kill -9 of the master and a new one on the same address, both nodes
    report their copies and the new master keeps both as copies of one block: nothing is
    copied again. Then kill -9 of node A: every block is still read, from node B."""
    (a, b, c), master, nodes = start_pool(hosts, "--replicas", "2", node_args=("--data-dir", str(tmp_path)))
    assert run_client(a, "publish", master, 1, 6)["written"] == 6
    assert wait_copies(c, master, {("node-a", "dram"): 6, ("node-b", "dram"): 6})["replicated"] == 6
    deadline = time.monotonic() + 20                              # both nodes know what they hold
    while any(int(n["unapplied_changes"]) for n in admin(c, master, "nodes")["nodes"]):
        assert time.monotonic() < deadline, "the nodes did not apply the master's changes"
        time.sleep(0.3)
    nodes["master"].kill()
    nodes["master"].wait(timeout=10)
    _, again = start_master(c, "--replicas", "2", port=master.rsplit(":", 1)[1])
    assert again == master
    wait_nodes(c, master, 2)
    got = wait_copies(c, master, {("node-a", "dram"): 6, ("node-b", "dram"): 6})
    time.sleep(1.5)                                               # three replication sweeps
    got = copies(c, master)
    assert got["replicated"] == 0, got                            # both copies adopted: no copy traffic
    assert got["held"][("node-a", "dram")] == got["held"][("node-b", "dram")] == 6
    listed = admin(c, master, "ls", "--limit", "20")["blocks"]      # each block: one entry, two copies
    assert len(listed) == 6 and all(len(b["copies"]) == 2 for b in listed), listed
    key = base64.b64decode(listed[0]["key"]).hex()
    shown = c.run([sys.executable, "-m", "kvpool", "admin", "inspect", key, "--address", master],
                  capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and re.search(r"copies\s+node \d+: dram; node \d+: dram", shown.stdout), shown.stdout
    fetched = run_client(b, "fetch", master, 1, 6)                # a reader on host b: its host's copy
    assert fetched["hit"] == 6 and fetched["ok"] and set(fetched["kinds"].values()) == {"shm"}, fetched
    nodes["node-a"].kill()
    nodes["node-a"].wait(timeout=10)
    wait_nodes(c, master, 1)
    fetched = run_client(c, "fetch", master, 1, 6)
    assert fetched["hit"] == 6 and fetched["ok"], fetched
