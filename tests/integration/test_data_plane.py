"""The TCP data server of a real `kvpool serve`: it serves only what the master allowed, and
bytes damaged on the wire are caught, dropped and never handed back as good.

Each refusal is shown against the server, which keeps serving its committed blocks after.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import time

import numpy as np
import pytest

from kvpool import Client, errors
from kvpool.client.shares import plan
from kvpool.rpc.v1 import pool_pb2
from kvpool.transport.base import READ, WRITE
from kvpool.transport.frames import REQUEST, REQUEST_MAGIC, RESPONSE, Status, recv_exact
from kvpool.wire import RECORD_DTYPE
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks


def tcp_client(sp, ns) -> Client:
    return Client(sp.address, ns, transport="tcp", connect_timeout=2, io_timeout=5)


def leased_share(c: Client, keys):
    """Take a read lease on ``keys`` and return its one planned share (over TCP) and the lease."""
    resp = c._run(c._async._call_ns(c.namespace, "Get", pool_pb2.GetRequest(
        namespace_id=c.namespace.id, keys=b"".join(keys))))
    (p,) = plan(resp.locations, c._async.transports, READ, resp.lease_id, 1, {})
    return p, resp


def still_serving(c: Client, keys, data) -> None:
    assert [bytes(b) for b in c.get_blocks(keys)] == [d.tobytes() for d in data]


@pytest.fixture
def pool(serve_factory):
    sp = serve_factory("--lease-ttl", "2")
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(3)]
    data = random_blocks(3, seed=7)
    with tcp_client(sp, ns) as c:
        assert c.put_blocks(keys, data).written == 3
        assert c._async.transports.open_kinds() == {1: "tcp"}
        yield sp, c, keys, data


def test_reads_and_writes_over_tcp_round_trip(pool):
    sp, c, keys, data = pool
    out = np.zeros_like(data)
    c.get_blocks(keys, out)
    assert (out == data).all()
    assert "data=127.0.0.1:" in sp.log()


def test_tampered_capability_is_refused(pool):
    _, c, keys, data = pool
    p, _ = leased_share(c, keys)
    bad = dataclasses.replace(p.share.access, mac=bytes(32))
    with pytest.raises(errors.FailedPrecondition, match="capability does not match"):
        p.transport.read(dataclasses.replace(p.share, access=bad), [np.empty(SMALL.block_bytes, np.uint8)] * 3)
    still_serving(c, keys, data)


def test_slot_outside_the_lease_is_refused(pool):
    _, c, keys, data = pool
    p, _ = leased_share(c, keys[:1])          # a lease on the first block only
    records = np.frombuffer(p.share.access.records, dtype=RECORD_DTYPE).copy()
    records["offset"] += SMALL.block_bytes   # point at the neighbouring slot
    moved = dataclasses.replace(p.share.access, records=records.tobytes())
    with pytest.raises(errors.FailedPrecondition, match="capability does not match"):
        p.transport.read(dataclasses.replace(p.share, records=records, access=moved),
                         [np.empty(SMALL.block_bytes, np.uint8)])
    # Naming a record past the end of the signed list is refused too.
    with pytest.raises(errors.InvalidArgument, match="outside the capability"):
        p.transport.read(dataclasses.replace(p.share, positions=np.array([5])),
                         [np.empty(SMALL.block_bytes, np.uint8)])
    still_serving(c, keys, data)


def test_expired_lease_is_refused(pool):
    _, c, keys, data = pool
    p, _ = leased_share(c, keys)
    time.sleep(2.3)                           # --lease-ttl 2
    with pytest.raises(errors.FailedPrecondition, match="expired"):
        p.transport.read(p.share, [np.empty(SMALL.block_bytes, np.uint8) for _ in range(3)])
    still_serving(c, keys, data)


def test_read_capability_cannot_write(pool):
    _, c, keys, data = pool
    p, _ = leased_share(c, keys[:1])
    writer = dataclasses.replace(p.share.access, op=WRITE)   # same MAC, other operation
    with pytest.raises(errors.FailedPrecondition, match="capability does not match"):
        p.transport.write(dataclasses.replace(p.share, access=writer), [np.zeros(SMALL.block_bytes, np.uint8)])
    still_serving(c, keys, data)


def _raw(address: str, payload: bytes) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(payload)
        _, status, msg_len, _ = RESPONSE.unpack(recv_exact(s, RESPONSE.size))
        return status, recv_exact(s, msg_len).decode()


def test_a_grant_writes_each_slot_once(pool):
    _, c, keys, data = pool
    new = [os.urandom(16)]
    start = c._run(c._async._call_ns(c.namespace, "PutStart", pool_pb2.PutStartRequest(
        namespace_id=c.namespace.id, keys=new[0], sizes=[SMALL.block_bytes])))
    (p,) = plan(start.grants, c._async.transports, WRITE, start.put_id, 1, {})
    block = random_blocks(1, seed=12)[0]
    (checksum,) = p.transport.write(p.share, [block])
    c._run(c._async._call("PutCommit", pool_pb2.PutCommitRequest(put_id=start.put_id, checksums=[checksum])))
    # The grant's capability has not expired, but the committed block cannot be overwritten.
    with pytest.raises(errors.FailedPrecondition, match="written already"):
        p.transport.write(p.share, [np.zeros(SMALL.block_bytes, np.uint8)])
    assert bytes(c.get_blocks(new)[0]) == block.tobytes()
    still_serving(c, keys, data)


def test_garbage_and_damaged_writes_are_refused(pool):
    sp, c, keys, data = pool
    address = c._async._endpoints[1].tcp_address
    status, msg = _raw(address, b"GET / HTTP/1.1\r\n\r\n" + bytes(REQUEST.size))
    assert status == Status.INVALID and "data port" in msg
    # A write whose bytes do not match the checksum that trails them is refused: never committed.
    new = [os.urandom(16)]
    start = c._run(c._async._call_ns(c.namespace, "PutStart", pool_pb2.PutStartRequest(
        namespace_id=c.namespace.id, keys=new[0], sizes=[SMALL.block_bytes])))
    (p,) = plan(start.grants, c._async.transports, WRITE, start.put_id, 1, {})
    a = p.share.access
    gid = a.grant_id.encode()
    block = random_blocks(1, seed=9)[0]
    header = REQUEST.pack(REQUEST_MAGIC, WRITE, 0, len(gid), len(a.records) // 32, 1, a.expires_unix_ms, a.mac)
    status, msg = _raw(address, header + gid + a.records + struct.pack("<I", 0) + block.tobytes()
                       + struct.pack("<Q", 12345))
    assert status == Status.DATA_LOSS and "checksum" in msg
    still_serving(c, keys, data)


def test_byte_flipped_on_the_wire_is_caught_and_dropped(serve_factory):
    sp = serve_factory(env={"KVPOOL_FAULT_CORRUPT_SENDS": "1"})
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(2)]
    data = random_blocks(2, seed=3)
    with tcp_client(sp, ns) as c:
        c.put_blocks(keys, data)
        out = np.zeros_like(data)
        with pytest.raises(errors.IntegrityError, match="failed their xxh3-64 checksum"):
            c.get_blocks(keys, out)
        # The damaged replica (whichever share the node served first) is dropped and counted;
        # the other block is still served, intact.
        assert c.stats().corrupt_blocks == 1
        after = c.get_blocks(keys, allow_missing=True)
        assert [b is None for b in after].count(True) == 1
        assert all(bytes(b) == d.tobytes() for b, d in zip(after, data) if b is not None)
    assert "corrupting one block" in sp.log()


def test_serve_with_ucx_moves_blocks_one_sided(serve_factory):
    sp = serve_factory("--ucx", "true")
    assert "ucx=on" in sp.log()
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(4)]
    data = random_blocks(4, seed=11)
    with Client(sp.address, ns, transport="ucx", connect_timeout=2, io_timeout=5) as c:
        c.put_blocks(keys, data)
        out = np.zeros_like(data)
        c.register_buffers([out])  # explicit registration: RDMA pins it once
        c.get_blocks(keys, out)
        assert (out == data).all() and c._async.transports.open_kinds() == {1: "ucx"}
