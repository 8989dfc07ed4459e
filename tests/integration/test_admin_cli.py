"""`kvpool admin` against a real server: tables, --json, and its error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kvpool import Client
from tests.integration.helpers import fresh_namespace, random_blocks


def admin(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", address, *args],
                          capture_output=True, text=True, timeout=60)


def test_stats_ls_inspect_evict_flush(serve_factory):
    sp = serve_factory()
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(4)]
    with Client(sp.address, ns) as c:
        c.put_blocks(keys, random_blocks(4))
        c.get_blocks(keys[:1])

    r = admin(sp.address, "stats")
    assert r.returncode == 0 and "blocks" in r.stdout and "dram" in r.stdout
    stats = json.loads(admin(sp.address, "--json", "stats").stdout)
    assert stats["blocks"] == "4" or stats["blocks"] == 4
    assert stats["tiers"][0]["tier"] == "dram"

    r = admin(sp.address, "ls")
    assert r.returncode == 0 and all(k.hex() in r.stdout for k in keys) and "(4 of 4 blocks)" in r.stdout
    listing = json.loads(admin(sp.address, "--json", "ls", "--limit", "2").stdout)
    assert len(listing["blocks"]) == 2 and int(listing["total"]) == 4

    r = admin(sp.address, "inspect", keys[0].hex())
    assert r.returncode == 0 and "committed" in r.stdout and ns.id in r.stdout
    detail = json.loads(admin(sp.address, "--json", "inspect", keys[0].hex()).stdout)["block"]
    assert detail["state"] == "committed" and int(detail["size"]) == ns.layout.block_bytes

    r = admin(sp.address, "evict", "--bytes", f"{ns.layout.block_bytes}")
    assert r.returncode == 0 and "evicted 1 blocks" in r.stdout
    r = admin(sp.address, "--json", "evict", "--all")
    assert json.loads(r.stdout)["blocks"] == 3

    with Client(sp.address, ns) as c:
        c.put_blocks(keys, random_blocks(4))
    r = admin(sp.address, "flush", "--namespace", ns.id)
    assert r.returncode == 0 and "removed 4 blocks" in r.stdout


def test_nodes_lists_the_in_process_node(server):
    r = admin(server.address, "nodes")
    assert r.returncode == 0 and "in process" in r.stdout and "dram" in r.stdout
    nodes = json.loads(admin(server.address, "--json", "nodes").stdout)["nodes"]
    assert len(nodes) == 1 and nodes[0]["in_process"] is True
    assert any(t["tier"] == "dram" for t in nodes[0]["tiers"])


def test_errors_are_readable_and_exit_nonzero(server):
    r = admin(server.address, "inspect", "zz")
    assert r.returncode == 2 and "32 hex digits" in r.stderr
    r = admin(server.address, "inspect", os.urandom(16).hex())
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "not in the pool" in r.stderr
    r = admin(server.address, "evict", "--bytes", "much")
    assert r.returncode == 2 and "4GiB" in r.stderr
    r = admin("127.0.0.1:1", "--timeout", "2", "stats")
    assert r.returncode == 2 and "cannot reach" in r.stderr
