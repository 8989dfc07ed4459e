"""`kvpool admin drain` against a real master with two real nodes (separate processes).

The blocks of the drained node move node to node over the data plane and read back
bit-exact from the other node; the drained node takes no new blocks until --resume; a
leased block is never moved; --drop lets blocks go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from kvpool import Client
from tests.integration.helpers import fresh_namespace, random_blocks, wait_for
from tests.integration.pool_processes import cluster, registered  # noqa: F401  (the fixture)


def kvpool(*args: str, address: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVPOOL_ADDRESS": address}
    return subprocess.run([sys.executable, "-m", "kvpool", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def node_ids(address: str) -> dict[str, int]:
    nodes = json.loads(kvpool("admin", "nodes", "--json", address=address).stdout)["nodes"]
    return {n["name"]: n["node_id"] for n in nodes}


def blocks_by_node(address: str) -> dict[int, int]:
    listing = json.loads(kvpool("admin", "ls", "--limit", "1000", "--json", address=address).stdout)
    out: dict[int, int] = {}
    for b in listing["blocks"]:
        out[b["node_id"]] = out.get(b["node_id"], 0) + 1
    return out


def test_drain_moves_blocks_to_the_other_node_and_stops_placement(cluster):
    master, node = cluster
    _, address = master()
    node(address, "node-a")
    node(address, "node-b")
    assert registered(address, 2)
    ids = node_ids(address)
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(24)]
    data = random_blocks(24, seed=7)
    with Client(address, ns) as c:
        c.put_blocks(keys, data)
    (full, n_full), = blocks_by_node(address).items()  # one batch lands on one node
    name = next(k for k, v in ids.items() if v == full)
    other = next(v for v in ids.values() if v != full)

    # A reader holds a lease on one block: drain must leave that one where it is.
    with Client(address, ns) as reader:
        lease = reader.lookup_leased(keys[:1])
        r = kvpool("admin", "drain", name, "--wait", "1", address=address)
        assert r.returncode == 1 and "1 blocks remain" in r.stderr and "leased" in r.stderr, r.stderr
        assert blocks_by_node(address) == {full: 1, other: 23}
        reader.release([lease.lease_id])
    r = kvpool("admin", "drain", name, address=address)
    assert r.returncode == 0, r.stderr
    assert "moved 1 blocks" in r.stdout and "0 left" in r.stdout
    assert blocks_by_node(address) == {other: 24}

    nodes = json.loads(kvpool("admin", "nodes", "--json", address=address).stdout)["nodes"]
    assert {n["name"]: n["draining"] for n in nodes} == {name: True, next(k for k in ids if k != name): False}
    with Client(address, ns) as c:
        out = c.get_blocks(keys)
        assert all(np.array_equal(np.frombuffer(o, np.uint8), d) for o, d in zip(out, data))
        # New blocks avoid the drained node, though it is now the emptier one.
        c.put_blocks([os.urandom(16) for _ in range(4)], random_blocks(4, seed=8))
    assert blocks_by_node(address) == {other: 28}

    r = kvpool("admin", "drain", name, "--resume", "--json", address=address)
    assert r.returncode == 0 and json.loads(r.stdout)["draining"] is False
    more = [os.urandom(16) for _ in range(4)]
    with Client(address, ns) as c:
        c.put_blocks(more, random_blocks(4, seed=9))
    assert blocks_by_node(address) == {other: 28, full: 4}  # the emptier node again

    r = kvpool("admin", "drain", str(full), "--drop", "--json", address=address)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dropped"] == 4 and report["remaining"] == 0 and report["moved"] == 0
    assert blocks_by_node(address) == {other: 28}


def test_drain_errors_name_the_problem(cluster):
    master, node = cluster
    _, address = master()
    node(address, "node-a")
    assert registered(address, 1)
    r = kvpool("admin", "drain", "no-such-node", address=address)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "node-a" in r.stderr
    r = kvpool("admin", "drain", "node-a", "--batch", "-1", address=address)
    assert r.returncode == 2 and "--batch must be a positive" in r.stderr
    ns = fresh_namespace()
    with Client(address, ns) as c:
        c.put_blocks([os.urandom(16)], random_blocks(1))
    r = kvpool("admin", "drain", "node-a", address=address)  # nowhere to move to
    assert r.returncode == 1 and "no other node" in r.stderr and "--drop" in r.stderr
    assert wait_for(lambda: sum(blocks_by_node(address).values()) == 1)  # nothing was lost


def test_drain_moves_blocks_that_were_demoted_to_nvme(cluster):
    master, node = cluster
    _, address = master()
    node(address, "node-a", "--nvme", "64MiB")
    assert registered(address, 1)
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(6)]
    data = random_blocks(6, seed=3)
    with Client(address, ns) as c:
        c.put_blocks(keys, data)
    r = kvpool("admin", "evict", "--all", address=address)  # with NVMe: demotes, nothing lost
    assert r.returncode == 0, r.stderr
    tiers = {b["tier"] for b in json.loads(kvpool("admin", "ls", "--json", address=address).stdout)["blocks"]}
    assert tiers == {"TIER_NVME"}
    node(address, "node-b")
    assert registered(address, 2)
    r = kvpool("admin", "drain", "node-a", "--json", address=address)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["moved"] == 6
    b = node_ids(address)["node-b"]
    assert blocks_by_node(address) == {b: 6}
    with Client(address, ns) as c:
        out = c.get_blocks(keys)
        assert all(np.array_equal(np.frombuffer(o, np.uint8), d) for o, d in zip(out, data))


def test_pull_with_bad_input_gets_a_status_and_the_node_keeps_serving(cluster):
    import grpc

    from kvpool.rpc.v1 import node_pb2, node_pb2_grpc

    master, node = cluster
    _, address = master()
    node(address, "node-a")
    assert registered(address, 1)
    nodes = json.loads(kvpool("admin", "nodes", "--json", address=address).stdout)["nodes"]
    control = nodes[0]["control_address"]
    with grpc.insecure_channel(control) as channel:
        stub = node_pb2_grpc.NodeControlStub(channel)
        for req, code, words in [
            (node_pb2.PullRequest(tier="dram", records=b"x" * 31, target_offsets=[0]),
             grpc.StatusCode.INVALID_ARGUMENT, "multiple of 32"),
            (node_pb2.PullRequest(tier="dram", records=b"\0" * 64, target_offsets=[0]),
             grpc.StatusCode.INVALID_ARGUMENT, "2 records but 1 target slots"),
            (node_pb2.PullRequest(tier="hbm", records=b"\0" * 32, target_offsets=[0]),
             grpc.StatusCode.INVALID_ARGUMENT, "no host-memory tier 'hbm'"),
            (node_pb2.PullRequest(tier="dram", records=b"\0" * 32, target_offsets=[0], keys=[b"k" * 16]),
             grpc.StatusCode.INVALID_ARGUMENT, "give one of each per record"),
            (node_pb2.PullRequest(tier="dram", records=b"\0" * 32, target_offsets=[0], keys=[b"k"],
                                  namespace_ids=["n"]),
             grpc.StatusCode.INVALID_ARGUMENT, "a block key is 16 bytes"),
        ]:
            try:
                stub.Pull(req, timeout=10)
                raise AssertionError("Pull accepted bad input")
            except grpc.RpcError as exc:
                assert exc.code() == code and words in exc.details(), exc.details()
    # A source that refuses the (unsigned) capability: the status says so; nothing is written.
    with grpc.insecure_channel(control) as channel:
        stub = node_pb2_grpc.NodeControlStub(channel)
        src = node_pb2.PullRequest(tier="dram", records=b"\0" * 32, target_offsets=[0], grant_id="g",
                                   expires_unix_ms=2**62, mac=b"\0" * 32)
        src.source.tcp_address = "127.0.0.1:1"
        src.source.name = "nowhere"
        try:
            stub.Pull(src, timeout=30)
            raise AssertionError("Pull from nowhere succeeded")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and "nowhere" in exc.details(), exc.details()
        # MoveTier (HBM -> DRAM demotion) checks its tiers and slots before copying anything.
        item = node_pb2.MoveItem(key=b"k" * 16, offset=0, size=4096, target_offset=0)
        for req, words in [
            (node_pb2.MoveTierRequest(source_tier="hbm", target_tier="dram", items=[item]),
             "names the hbm tier, which this node does not have"),
            (node_pb2.MoveTierRequest(source_tier="dram", target_tier="dram", items=[
                node_pb2.MoveItem(key=b"k" * 16, offset=0, size=4096, target_offset=2**40)]), "lies outside"),
        ]:
            try:
                stub.MoveTier(req, timeout=10)
                raise AssertionError("MoveTier accepted bad input")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and words in exc.details(), exc.details()
        # The deprecated Replicate (a master of the previous release) runs the same copy.
        old = node_pb2.ReplicateRequest(records=b"\0" * 32, target_offsets=[0], keys=[b"k" * 16],
                                        namespace_ids=["n"], tier="dram", lease_id="g", source=src.source)
        old.capability.expires_unix_ms = 2**62
        assert "nowhere" in stub.Replicate(old, timeout=30).error
        del old.keys[:]
        try:
            stub.Replicate(old, timeout=10)
            raise AssertionError("Replicate accepted records without keys")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "one target offset, key" in exc.details()
    ns = fresh_namespace()
    with Client(address, ns) as c:  # still serving
        assert c.put_blocks([os.urandom(16)], random_blocks(1)).written == 1


def test_drain_moves_each_tenants_blocks_under_auth(tmp_path):
    """With tokens and tenants: the drain's read capability is signed for each block's tenant
    (kvpool-cap/v2), so blocks of two tenants move, and each tenant reads back its own bytes.
    The admin token goes after the subcommand, and the node token before it (common flags)."""
    import secrets

    from tests.conftest import start_kvpool

    tokens = {name: secrets.token_hex(16) for name in ("alice", "bob", "admin", "node")}
    table = tmp_path / "tokens"
    table.write_text(f"{tokens['alice']} client alice\n{tokens['bob']} client bob\n{tokens['admin']} admin\n"
                     f"{tokens['node']} node\n")
    (tmp_path / "node.token").write_text(tokens["node"] + "\n")
    procs = []

    def start(args, pattern):
        proc, m, _ = start_kvpool(args, pattern)
        procs.append(proc)
        return m

    def admin(*args: str) -> subprocess.CompletedProcess:
        return kvpool("admin", *args, "--token", tokens["admin"], address=address)

    def where() -> dict[int, int]:
        r = admin("ls", "--limit", "1000", "--json")
        assert r.returncode == 0, r.stderr
        out: dict[int, int] = {}
        for b in json.loads(r.stdout)["blocks"]:
            out[b["node_id"]] = out.get(b["node_id"], 0) + 1
        return out

    try:
        address = start(["master", "--port", "0", "--metrics-port", "-1", "--heartbeat-interval", "1",
                         "--auth-tokens", str(table)], r"ready grpc=(\S+)").group(1)

        def node(name: str) -> None:
            start(["node", "--master", address, "--port", "0", "--node-name", name, "--data-dir",
                   str(tmp_path / name), "--token-file", str(tmp_path / "node.token")], r"ready control=\S+")

        node("node-a")
        assert wait_for(lambda: admin("stats", "--json").returncode == 0
                        and json.loads(admin("stats", "--json").stdout).get("nodes") == 1, 20)
        written = {}
        for tenant, seed in (("alice", 1), ("bob", 2)):
            ns = fresh_namespace(tenant=tenant)
            keys, data = [os.urandom(16) for _ in range(6)], random_blocks(6, seed=seed)
            with Client(address, ns, token=tokens[tenant]) as c:
                c.put_blocks(keys, data)
            written[tenant] = (ns, keys, data)
        (source, n), = where().items()
        assert n == 12
        node("node-b")
        assert wait_for(lambda: json.loads(admin("stats", "--json").stdout).get("nodes") == 2, 20)

        r = kvpool("admin", "--token", tokens["admin"], "drain", "node-a", "--json", address=address)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["moved"] == 12 and report["failed"] == 0 and report["remaining"] == 0, report
        (target, n), = where().items()
        assert target != source and n == 12
        for tenant, (ns, keys, data) in written.items():
            with Client(address, ns, token=tokens[tenant]) as c:
                out = c.get_blocks(keys)
                assert all(np.array_equal(np.frombuffer(o, np.uint8), d) for o, d in zip(out, data))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)
