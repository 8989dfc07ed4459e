"""Bad input gets a gRPC status a person can act on, and the server keeps serving.

After every bad request, the same server still answers and still holds the committed
block put at the start of the module.
"""

from __future__ import annotations

import os

import grpc
import pytest

from kvpool import Client
from kvpool.rpc.v1 import admin_pb2, common_pb2, pool_pb2
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks
from kvpool.client.async_client import namespace_to_proto
from tests.integration.rpc_helpers import register, status_of, stubs

NS = fresh_namespace()
KEY = os.urandom(16)
Code = grpc.StatusCode


@pytest.fixture(scope="module", autouse=True)
def committed_block(server):
    with Client(server.address, NS) as c:
        c.put_blocks([KEY], random_blocks(1))


@pytest.fixture
def rpc(server):
    with stubs(server.address) as (pool, admin):
        ns_id = register(pool, NS)
        yield pool, admin, ns_id
    # The server survived and lost nothing committed.
    with Client(server.address, NS) as c:
        assert bytes(c.get_blocks([KEY])[0]) == random_blocks(1).tobytes()


def test_wrong_block_size(rpc):
    pool, _, ns = rpc
    code, msg = status_of(pool.PutStart, pool_pb2.PutStartRequest(namespace_id=ns, keys=os.urandom(16), sizes=[100]))
    assert code == Code.INVALID_ARGUMENT
    assert f"blocks of {SMALL.block_bytes} bytes" in msg


def test_sizes_do_not_match_keys(rpc):
    pool, _, ns = rpc
    code, msg = status_of(pool.PutStart, pool_pb2.PutStartRequest(namespace_id=ns, keys=os.urandom(32), sizes=[SMALL.block_bytes]))
    assert code == Code.INVALID_ARGUMENT and "one size per key" in msg


def test_unknown_namespace(rpc):
    pool, _, _ = rpc
    code, msg = status_of(pool.Lookup, pool_pb2.LookupRequest(namespace_id="feedface", keys=os.urandom(16)))
    assert code == Code.NOT_FOUND and "RegisterNamespace" in msg


@pytest.mark.parametrize("method", ["Lookup", "Get", "PutStart", "Remove"])
def test_malformed_keys(rpc, method):
    pool, _, ns = rpc
    req = {
        "Lookup": pool_pb2.LookupRequest(namespace_id=ns, keys=b"x" * 17),
        "Get": pool_pb2.GetRequest(namespace_id=ns, keys=b"x" * 15),
        "PutStart": pool_pb2.PutStartRequest(namespace_id=ns, keys=b"x" * 20, sizes=[SMALL.block_bytes]),
        "Remove": pool_pb2.RemoveRequest(keys=b"x" * 5),
    }[method]
    code, msg = status_of(getattr(pool, method), req)
    assert code == Code.INVALID_ARGUMENT and "multiple of 16" in msg


@pytest.mark.parametrize("method", ["Lookup", "Get"])
def test_empty_batch(rpc, method):
    pool, _, ns = rpc
    req = (pool_pb2.LookupRequest if method == "Lookup" else pool_pb2.GetRequest)(namespace_id=ns, keys=b"")
    code, msg = status_of(getattr(pool, method), req)
    assert code == Code.INVALID_ARGUMENT and "empty" in msg


def test_oversized_batch(server, tmp_path, serve_factory):
    small = serve_factory("--max-batch", "8")
    with stubs(small.address) as (pool, _):
        ns = register(pool, NS)
        code, msg = status_of(pool.Lookup, pool_pb2.LookupRequest(namespace_id=ns, keys=os.urandom(16 * 9)))
        assert code == Code.INVALID_ARGUMENT and "exceeds the limit of 8" in msg and "split" in msg
        assert status_of(pool.Lookup, pool_pb2.LookupRequest(namespace_id=ns, keys=os.urandom(16 * 8)))[0] == Code.OK


def test_commit_unknown_grant(rpc):
    pool, _, _ = rpc
    code, msg = status_of(pool.PutCommit, pool_pb2.PutCommitRequest(put_id="nope", checksums=[]))
    assert code == Code.NOT_FOUND and "PutStart again" in msg


def test_commit_key_not_granted(rpc):
    pool, _, ns = rpc
    resp = pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns, keys=os.urandom(16), sizes=[SMALL.block_bytes]))
    code, msg = status_of(pool.PutCommit, pool_pb2.PutCommitRequest(put_id=resp.put_id, keys=os.urandom(16), checksums=[1]))
    assert code == Code.FAILED_PRECONDITION and "PUT_GRANTED" in msg
    assert pool.PutAbort(pool_pb2.PutAbortRequest(put_id=resp.put_id)).released == 1


def test_commit_with_a_key_twice(rpc):
    pool, _, ns = rpc
    key = os.urandom(16)
    resp = pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns, keys=key, sizes=[SMALL.block_bytes]))
    code, msg = status_of(pool.PutCommit, pool_pb2.PutCommitRequest(put_id=resp.put_id, keys=key * 2, checksums=[1, 1]))
    assert code == Code.INVALID_ARGUMENT and "listed twice" in msg
    assert pool.PutAbort(pool_pb2.PutAbortRequest(put_id=resp.put_id)).released == 1


def test_commit_with_wrong_checksum_count(rpc):
    pool, _, ns = rpc
    resp = pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns, keys=os.urandom(32), sizes=[SMALL.block_bytes] * 2))
    code, msg = status_of(pool.PutCommit, pool_pb2.PutCommitRequest(put_id=resp.put_id, checksums=[1]))
    assert code == Code.INVALID_ARGUMENT and "one xxh3-64 checksum per block" in msg
    pool.PutAbort(pool_pb2.PutAbortRequest(put_id=resp.put_id))


def test_invalid_layout(rpc):
    pool, _, _ = rpc
    bad = common_pb2.Namespace(model="m", layout=common_pb2.KVLayout(num_layers=0, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=16))
    code, msg = status_of(pool.RegisterNamespace, pool_pb2.RegisterNamespaceRequest(namespace=bad))
    assert code == Code.INVALID_ARGUMENT and "num_layers" in msg
    bad.layout.num_layers, bad.layout.dtype = 1, "float13"
    code, msg = status_of(pool.RegisterNamespace, pool_pb2.RegisterNamespaceRequest(namespace=bad))
    assert code == Code.INVALID_ARGUMENT and "float13" in msg
    no_layout = common_pb2.Namespace(model="m")
    assert status_of(pool.RegisterNamespace, pool_pb2.RegisterNamespaceRequest(namespace=no_layout))[0] == Code.INVALID_ARGUMENT


def test_admin_bad_input(rpc):
    _, admin, _ = rpc
    assert status_of(admin.Inspect, admin_pb2.InspectRequest(key=b"short"))[0] == Code.INVALID_ARGUMENT
    code, msg = status_of(admin.Inspect, admin_pb2.InspectRequest(key=os.urandom(16)))
    assert code == Code.NOT_FOUND and "not in the pool" in msg
    code, msg = status_of(admin.Evict, admin_pb2.EvictRequest())
    assert code == Code.INVALID_ARGUMENT and "all=true" in msg
    assert status_of(admin.ListBlocks, admin_pb2.ListBlocksRequest(namespace_id="nope"))[0] == Code.NOT_FOUND


def test_release_of_unknown_lease_is_harmless(rpc):
    pool, _, _ = rpc
    assert pool.Release(pool_pb2.ReleaseRequest(lease_ids=["nope"])).released == 0


def test_bad_replicas_settings(rpc):
    pool, admin, ns = rpc
    proto = pool_pb2.RegisterNamespaceRequest(namespace=namespace_to_proto(NS), replicas=9)
    code, msg = status_of(pool.RegisterNamespace, proto)
    assert code == Code.INVALID_ARGUMENT and "between 1 and 8" in msg
    for req, want, words in [
        (admin_pb2.NamespacesRequest(set_replicas=2), Code.INVALID_ARGUMENT, "needs namespace_id"),
        (admin_pb2.NamespacesRequest(namespace_id=ns, set_replicas=0), Code.INVALID_ARGUMENT, "at least 1"),
        (admin_pb2.NamespacesRequest(namespace_id=ns, set_replicas=99), Code.INVALID_ARGUMENT, "between 1 and 8"),
        (admin_pb2.NamespacesRequest(namespace_id="feedface", set_replicas=2), Code.NOT_FOUND, "RegisterNamespace"),
    ]:
        code, msg = status_of(admin.Namespaces, req)
        assert (code, words in msg) == (want, True), msg
    listed = admin.Namespaces(admin_pb2.NamespacesRequest(namespace_id=ns), timeout=10)
    assert [(n.replicas, n.replicas_default) for n in listed.namespaces] == [(1, True)]  # nothing changed
