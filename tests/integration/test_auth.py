"""Bearer tokens on every gRPC service (kvpool.auth), against real processes.

A missing or unknown token gets UNAUTHENTICATED; a role that may not call a method gets
PERMISSION_DENIED; a client token acts for one tenant only. The embedded default stays
token-free on loopback and refuses to listen beyond it without tokens unless --insecure.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpool import Client
from kvpool.errors import PermissionDenied, Unauthenticated
from kvpool.rpc.v1 import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc, pool_pb2, pool_pb2_grpc
from tests.conftest import start_kvpool
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, tokens, wait_for
from tests.integration.rpc_helpers import register, status_of

Code = grpc.StatusCode
TOKENS = {name: secrets.token_hex(16) for name in ("alice", "bob", "admin", "node")}


def bearer(name: str):
    return (("authorization", f"Bearer {TOKENS[name]}"),)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    path = d / "tokens"
    path.write_text(f"# token role tenant\n{TOKENS['alice']} client alice\n{TOKENS['bob']} client bob\n"
                    f"{TOKENS['admin']} admin   # operators\n{TOKENS['node']} node\n")
    for name, tok in TOKENS.items():
        (d / f"{name}.token").write_text(tok + "\n")
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory, token_file):
    from tests.conftest import start_serve

    sp = start_serve(tmp_path_factory.mktemp("serve"), "--auth-tokens", str(token_file))
    yield sp
    sp.stop()


@pytest.fixture
def channel(secured):
    ch = grpc.insecure_channel(secured.address)
    yield ch
    ch.close()


def test_no_token_or_a_wrong_one_is_unauthenticated(channel):
    pool, admin = pool_pb2_grpc.KVPoolStub(channel), admin_pb2_grpc.AdminStub(channel)
    registry = node_pb2_grpc.RegistryStub(channel)
    calls = [(pool.Stats, common_pb2.StatsRequest()), (admin.Flush, admin_pb2.FlushRequest()),
             (registry.Heartbeat, node_pb2.HeartbeatRequest())]
    for call, req in calls:
        code, msg = status_of(call, req)
        assert code == Code.UNAUTHENTICATED and "authorization: Bearer" in msg
        code, msg = status_of(call, req, metadata=(("authorization", "Bearer " + "x" * 32),))
        assert code == Code.UNAUTHENTICATED and "not one this server accepts" in msg
    # Probes need no token.
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_each_role_calls_only_its_methods(channel):
    pool, admin = pool_pb2_grpc.KVPoolStub(channel), admin_pb2_grpc.AdminStub(channel)
    registry = node_pb2_grpc.RegistryStub(channel)
    denied = [("alice", admin.Flush, admin_pb2.FlushRequest()), ("alice", admin.Stats, common_pb2.StatsRequest()),
              ("alice", registry.Heartbeat, node_pb2.HeartbeatRequest()),
              ("node", pool.Stats, common_pb2.StatsRequest()), ("node", admin.Stats, common_pb2.StatsRequest()),
              ("admin", registry.Heartbeat, node_pb2.HeartbeatRequest())]
    for who, call, req in denied:
        code, msg = status_of(call, req, metadata=bearer(who))
        assert code == Code.PERMISSION_DENIED, (who, call)
        assert "token may not call this" in msg
    assert status_of(pool.Stats, common_pb2.StatsRequest(), metadata=bearer("alice"))[0] == Code.OK
    assert status_of(admin.Stats, common_pb2.StatsRequest(), metadata=bearer("admin"))[0] == Code.OK
    assert status_of(registry.Heartbeat, node_pb2.HeartbeatRequest(), metadata=bearer("node"))[0] == Code.OK


def test_a_client_token_acts_for_its_tenant_only(secured, channel, token_file):
    alice_ns = fresh_namespace(tenant="alice")
    toks, data = tokens(3 * SMALL.block_tokens, seed=5), random_blocks(3, seed=5)
    with Client(secured.address, alice_ns, token=TOKENS["alice"]) as alice:
        assert alice.publish(toks, data).written == 3
    # bob's token cannot claim alice's tenant, nor use her namespace by id.
    with Client(secured.address, fresh_namespace(tenant="alice"), token=TOKENS["bob"]) as bob:
        with pytest.raises(PermissionDenied, match="acts for tenant 'bob'"):
            bob.match(toks)
    pool = pool_pb2_grpc.KVPoolStub(channel)
    code, msg = status_of(pool.Lookup, pool_pb2.LookupRequest(namespace_id=alice_ns.id, keys=alice_ns.keys(toks)[0]),
                          metadata=bearer("bob"))
    assert code == Code.NOT_FOUND and "not registered" in msg
    # An admin token reads any tenant; the token may come from the environment or a file.
    env = {"KVPOOL_TOKEN_FILE": str(token_file.parent / "admin.token")}
    os.environ.update(env)
    try:
        with Client(secured.address, alice_ns) as admin:
            out = bytearray(3 * SMALL.block_bytes)
            assert admin.fetch(toks, out) == 3 and bytes(out) == data.tobytes()
    finally:
        del os.environ["KVPOOL_TOKEN_FILE"]
    with Client(secured.address, alice_ns) as nobody, pytest.raises(Unauthenticated):
        nobody.match(toks)


def admin_cli(address: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", address, *args],
                          capture_output=True, text=True, timeout=60, env=full)


def test_admin_cli_takes_a_token(secured, token_file):
    d = token_file.parent
    bob_ns = fresh_namespace(tenant="bob")
    keys = [os.urandom(16) for _ in range(2)]
    with Client(secured.address, bob_ns, token=TOKENS["bob"]) as bob:
        bob.put_blocks(keys, random_blocks(2))
    r = admin_cli(secured.address, "stats")
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr and "KVPOOL_TOKEN" in r.stderr
    r = admin_cli(secured.address, "--token-file", str(d / "admin.token"), "stats")
    assert r.returncode == 0 and "blocks" in r.stdout
    r = admin_cli(secured.address, "stats", env={"KVPOOL_TOKEN": TOKENS["alice"]})
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    # A client token lists its own tenant's blocks, whatever --tenant it asks for.
    r = admin_cli(secured.address, "--token", TOKENS["bob"], "ls", "--limit", "1000")
    assert r.returncode == 0 and all(k.hex() in r.stdout for k in keys)
    r = admin_cli(secured.address, "--token", TOKENS["alice"], "ls", "--tenant", "bob", "--limit", "1000")
    assert r.returncode == 0 and not any(k.hex() in r.stdout for k in keys)


def test_a_non_loopback_listen_needs_tokens_or_insecure(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvpool", "serve", "--host", "0.0.0.0", "--port", "0",
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in r.stderr and "--insecure" in r.stderr
    proc, _, lines = start_kvpool(["serve", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1",
                                   "--data-dir", str(tmp_path / "d"), "--insecure"], r"ready grpc=(\S+)")
    try:
        assert any("WITHOUT authentication" in line for line in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_bad_token_file_is_refused_saying_which_line(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKENS['alice']} client alice\nshort admin\n")
    r = subprocess.run([sys.executable, "-m", "kvpool", "serve", "--port", "0", "--auth-tokens", str(path),
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{path}:2" in r.stderr and "at least 16" in r.stderr


def test_master_and_node_with_node_tokens(tmp_path, token_file):
    d = token_file.parent
    procs = []
    try:
        proc, m, mlines = start_kvpool(["master", "--port", "0", "--metrics-port", "-1", "--auth-tokens",
                                        str(token_file), "--heartbeat-interval", "0.2"], r"ready grpc=(\S+)")
        procs.append(proc)
        address = m.group(1)
        proc, m, nlines = start_kvpool(["node", "--master", address, "--port", "0", "--data-dir", str(tmp_path / "n"),
                                        "--nvme", "8MiB", "--token-file", str(d / "node.token")],
                                       r"ready control=(\S+)")
        procs.append(proc)
        control = m.group(1)
        admin_md = bearer("admin")
        with grpc.insecure_channel(address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            assert wait_for(lambda: admin.Stats(common_pb2.StatsRequest(), metadata=admin_md).nodes == 1, 15)
            ns = fresh_namespace(tenant="alice")
            keys, data = [os.urandom(16) for _ in range(3)], random_blocks(3, seed=3)
            with Client(address, ns, token=TOKENS["alice"]) as alice:
                alice.put_blocks(keys, data)
                # The master moves blocks with the node's own token: demote all, read back (promote).
                assert admin.Evict(admin_pb2.EvictRequest(all=True), metadata=admin_md, timeout=30).blocks == 3
                assert np.array_equal(np.stack(alice.get_blocks(keys)), data)
            s = admin.Stats(common_pb2.StatsRequest(), metadata=admin_md)
            assert s.demoted_blocks == 3 and s.promoted_blocks == 3
        # The node's control service answers only its own token.
        with grpc.insecure_channel(control) as ch:
            ctl = node_pb2_grpc.NodeControlStub(ch)
            assert status_of(ctl.DropNvme, node_pb2.DropNvmeRequest())[0] == Code.UNAUTHENTICATED
            assert status_of(ctl.DropNvme, node_pb2.DropNvmeRequest(), metadata=bearer("alice"))[0] == Code.UNAUTHENTICATED
        # A node without a token is told why it cannot join.
        proc, _, lines = start_kvpool(["node", "--master", address, "--port", "0", "--data-dir", str(tmp_path / "x"),
                                       "--node-name", "tokenless"], r"ready control=(\S+)")
        procs.append(proc)
        assert wait_for(lambda: any("refused this node: UNAUTHENTICATED" in line for line in lines), 10)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)


def _listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP port of this machine listens on (/proc/net/tcp and tcp6)."""
    import ipaddress as ip

    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if int(p, 16) == port and state == "0A":  # LISTEN
                    raw = bytes.fromhex(addr)
                    # The kernel prints each 32-bit word in host (little-endian) order.
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    out.add(str(ip.ip_address(raw)))
    return out


def test_the_metrics_port_can_stay_on_loopback_while_grpc_listens_beyond(tmp_path, token_file):
    """The exporter authenticates nobody: --metrics-host keeps it on loopback for a local
    scraper while gRPC (with tokens) listens on every address."""
    proc, m, _ = start_kvpool(["serve", "--host", "0.0.0.0", "--port", "0", "--auth-tokens", str(token_file),
                               "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--data-dir", str(tmp_path / "d")],
                              r"ready grpc=\S+:(\d+) metrics=http://([^:]+):(\d+)/metrics")
    try:
        grpc_port, metrics_host, metrics_port = int(m.group(1)), m.group(2), int(m.group(3))
        assert metrics_host == "127.0.0.1"
        assert _listening_addresses(metrics_port) == {"127.0.0.1"}
        assert _listening_addresses(grpc_port) & {"0.0.0.0", "::"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
