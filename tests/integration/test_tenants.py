"""Tenant isolation (docs/design.md §3c): one tenant never sees another's blocks, even with the keys.

The issue's report, against a real ``kvpool serve``: a client of tenant ``bob``, given the
keys of ``alice``'s blocks, read her bytes and deleted them. Here bob gets exactly what he
gets for a block that does not exist, and alice keeps her blocks.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

from kvpool import Client
from kvpool.client.shares import plan
from kvpool.errors import BlockNotFound, FailedPrecondition
from kvpool.rpc.v1 import admin_pb2, pool_pb2
from kvpool.transport.base import READ
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, tokens
from tests.integration.rpc_helpers import register, status_of, stubs

Code = grpc.StatusCode


@pytest.fixture
def two_tenants(server):
    """alice publishes 4 blocks; bob's namespace is the same model with his tenant."""
    alice_ns = fresh_namespace(tenant="alice")
    bob_ns = fresh_namespace(tenant="bob")
    toks = tokens(4 * SMALL.block_tokens, seed=11)
    data = random_blocks(4, seed=11)
    with Client(server.address, alice_ns) as alice:
        alice.publish(toks, data)
        assert alice.match(toks) == 4
    return alice_ns, bob_ns, alice_ns.keys(toks), toks, data


def test_bob_cannot_read_or_remove_alices_blocks(server, two_tenants):
    alice_ns, bob_ns, keys, toks, data = two_tenants
    with Client(server.address, bob_ns) as bob:
        assert bob.lookup(keys) == 0
        with pytest.raises(BlockNotFound):
            bob.get_blocks(keys)
        assert bob.get_blocks(keys, allow_missing=True) == [None] * 4
        assert bob.remove(keys) == 0  # as for keys that were never put
    with Client(server.address, alice_ns) as alice:
        assert alice.match(toks) == 4
        got = alice.get_blocks(keys)
        assert np.array_equal(np.stack(got), data)


def test_answers_for_another_tenants_key_equal_those_for_a_missing_key(server, two_tenants):
    alice_ns, bob_ns, keys, _, _ = two_tenants
    missing = os.urandom(16)
    with stubs(server.address) as (pool, admin):
        bob_id = register(pool, bob_ns)
        for k in (keys[0], missing):
            look = pool.Lookup(pool_pb2.LookupRequest(namespace_id=bob_id, keys=k))
            get = pool.Get(pool_pb2.GetRequest(namespace_id=bob_id, keys=k))
            assert (look.hit_blocks, look.lease_id, get.found, get.lease_id) == (0, "", b"\x00", "")
            assert pool.Remove(pool_pb2.RemoveRequest(namespace_id=bob_id, keys=k)).removed == 0
            code, msg = status_of(admin.Inspect, admin_pb2.InspectRequest(key=k, tenant="bob"))
            assert code == Code.NOT_FOUND and "is not in the pool" in msg
        # bob's listing shows none of alice's blocks; hers shows all of them, marked hers.
        listed = admin.ListBlocks(admin_pb2.ListBlocksRequest(tenant="bob", limit=1000))
        assert not {b.key for b in listed.blocks} & set(keys)
        listed = admin.ListBlocks(admin_pb2.ListBlocksRequest(tenant="alice", limit=1000))
        mine = [b for b in listed.blocks if b.key in set(keys)]
        assert len(mine) == 4 and {b.tenant for b in mine} == {"alice"}


def test_no_deduplication_across_tenants(server, two_tenants):
    """bob putting alice's keys is granted fresh slots (not PRESENT: that would tell him she
    has them), and his bytes never reach her reads."""
    alice_ns, bob_ns, keys, _, data = two_tenants
    junk = random_blocks(4, seed=99)
    with Client(server.address, bob_ns) as bob:
        put = bob.put_blocks(keys, junk)
        assert (put.written, put.present) == (4, 0)
        assert np.array_equal(np.stack(bob.get_blocks(keys)), junk)
    with Client(server.address, alice_ns) as alice:
        assert np.array_equal(np.stack(alice.get_blocks(keys)), data)
        assert alice.put_blocks(keys, data).present == 4


def test_the_data_plane_capability_carries_the_tenant(server, two_tenants):
    """Over TCP the node checks the tenant the master signed: a lease of alice's presented
    as someone else's is refused, and the honest one reads her bytes."""
    alice_ns, _, keys, _, data = two_tenants
    with Client(server.address, alice_ns, transport="tcp") as alice:
        resp = alice._run(alice._async._call_ns(alice_ns, "Get", pool_pb2.GetRequest(
            namespace_id=alice_ns.id, keys=b"".join(keys))))
        assert {c.tenant for c in resp.locations.caps} == {"alice"}
        (p,) = plan(resp.locations, alice._async.transports, READ, resp.lease_id, 1, {})
        assert p.share.access.tenant == "alice"
        outs = [np.empty(SMALL.block_bytes, np.uint8) for _ in keys]
        forged = dataclasses.replace(p.share, access=dataclasses.replace(p.share.access, tenant="bob"))
        with pytest.raises(FailedPrecondition, match="does not match.*tenant 'bob'"):
            p.transport.read(forged, outs)
        p.transport.read(p.share, outs)
        assert np.array_equal(np.stack(outs), data)


def test_admin_ls_shows_one_tenant_as_typed(server, two_tenants):
    _, _, keys, _, _ = two_tenants
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", server.address, *a],
                                    capture_output=True, text=True, timeout=60)
    r = run("ls", "--tenant", "alice", "--limit", "1000")
    assert r.returncode == 0 and all(k.hex() in r.stdout for k in keys) and "alice" in r.stdout
    r = run("ls", "--tenant", "bob", "--limit", "1000")
    assert r.returncode == 0 and not any(k.hex() in r.stdout for k in keys)
    r = run("inspect", keys[0].hex(), "--tenant", "alice")
    assert r.returncode == 0 and "alice" in r.stdout
    r = run("inspect", keys[0].hex())  # the default tenant has no such block
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


OTHER_USER_CLIENT = """
import os, sys
import numpy as np
from kvpool import Client
from tests.integration.helpers import fresh_namespace, random_blocks, tokens

address, shm = sys.argv[1], sys.argv[2]
try:
    open(shm, "rb").close()
    print("mapped the arena", flush=True)
except PermissionError:
    print("arena refused", flush=True)
ns = fresh_namespace(tenant="bob")
toks = tokens(2 * ns.layout.block_tokens, seed=5)
data = random_blocks(2, seed=5)
with Client(address, ns) as c:
    c.publish(toks, data)
    out = c.get_blocks(ns.keys(toks))
    assert [bytes(b) for b in out] == [d.tobytes() for d in data], "wrong bytes"
    print("kinds", sorted(set(c._async.transports.open_kinds().values())), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"),
                    reason="needs root and setpriv to run a client as another OS user")
def test_a_client_of_another_os_user_cannot_map_the_arena_and_uses_tcp(server):
    # Shared memory gives a client the node's whole arena, every tenant's bytes: only the
    # node's own OS user may map it (mode 0600). A client running as another user is refused
    # the mapping and works over the TCP data plane, whose every request is checked.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", OTHER_USER_CLIENT,
         server.address, server.shm_path],
        capture_output=True, text=True, timeout=120, cwd=repo,
        env={**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "arena refused" in r.stdout and "kinds ['tcp']" in r.stdout, r.stdout
