"""The write/read protocol's guarantees, on a real server (docs/design.md §3).

* A block that was not committed is never readable.
* Aborted and expired grants free their slots.
* A leased block is never evicted or freed; a forgotten lease expires.
* A full pool with nothing evictable answers RESOURCE_EXHAUSTED; otherwise it evicts.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest
import xxhash

from kvpool import Client, errors
from kvpool.client.buffers import byte_view
from kvpool.rpc.v1 import admin_pb2, common_pb2, pool_pb2
from kvpool.transport.base import READ, WRITE
from tests.integration.helpers import SMALL, fresh_namespace, raw_copy, random_blocks, wait_for
from tests.integration.rpc_helpers import register, status_of, stubs

BLOCK = SMALL.block_bytes


def used_bytes(admin) -> int:
    return admin.Stats(common_pb2.StatsRequest()).tiers[0].used_bytes


def test_uncommitted_block_is_invisible(server):
    ns = fresh_namespace()
    key = os.urandom(16)
    with stubs(server.address) as (pool, _), Client(server.address, ns) as c:
        ns_id = register(pool, ns)
        start = pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns_id, keys=key, sizes=[BLOCK]))
        assert list(start.status) == [pool_pb2.PUT_GRANTED]
        # Bytes are written into the slot, but nothing is committed yet.
        raw_copy(c, start.grants, WRITE, start.put_id, [random_blocks(1)[0]])
        assert c.lookup([key]) == 0
        assert c.get_blocks([key], allow_missing=True) == [None]
        # A second writer is told the key is in flight, not granted twice.
        again = pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns_id, keys=key, sizes=[BLOCK]))
        assert list(again.status) == [pool_pb2.PUT_IN_FLIGHT]
        pool.PutCommit(pool_pb2.PutCommitRequest(put_id=start.put_id, checksums=[xxhash.xxh3_64_intdigest(random_blocks(1)[0])]))
        assert c.lookup([key]) == 1


def test_abort_frees_slots(serve_factory):
    sp = serve_factory()
    ns = fresh_namespace()
    with stubs(sp.address) as (pool, admin):
        ns_id = register(pool, ns)
        before = used_bytes(admin)
        start = pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns_id, keys=os.urandom(48), sizes=[BLOCK] * 3))
        assert used_bytes(admin) == before + 3 * BLOCK
        assert pool.PutAbort(pool_pb2.PutAbortRequest(put_id=start.put_id)).released == 3
        assert used_bytes(admin) == before
        assert status_of(pool.PutCommit, pool_pb2.PutCommitRequest(put_id=start.put_id, checksums=[0, 0, 0]))[0] == grpc.StatusCode.NOT_FOUND


def test_partial_commit_releases_the_rest(serve_factory):
    sp = serve_factory()
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(3)]
    with stubs(sp.address) as (pool, admin), Client(sp.address, ns) as c:
        ns_id = register(pool, ns)
        start = pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns_id, keys=b"".join(keys), sizes=[BLOCK] * 3))
        resp = pool.PutCommit(pool_pb2.PutCommitRequest(put_id=start.put_id, keys=keys[0], checksums=[7]))
        assert (resp.committed, resp.released) == (1, 2)
        assert used_bytes(admin) == BLOCK
        assert c.lookup(keys) == 1


def test_expired_grant_frees_its_slot(serve_factory):
    sp = serve_factory("--grant-ttl", "0.5")
    ns = fresh_namespace()
    with stubs(sp.address) as (pool, admin):
        ns_id = register(pool, ns)
        start = pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns_id, keys=os.urandom(16), sizes=[BLOCK]))
        assert used_bytes(admin) == BLOCK
        assert wait_for(lambda: used_bytes(admin) == 0, timeout=5)
        code, msg = status_of(pool.PutCommit, pool_pb2.PutCommitRequest(put_id=start.put_id, checksums=[0]))
        assert code == grpc.StatusCode.NOT_FOUND and "expired" in msg


def test_leased_block_is_never_evicted_or_freed(serve_factory):
    sp = serve_factory()
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(4)]
    data = random_blocks(4)
    with stubs(sp.address) as (pool, admin), Client(sp.address, ns) as c:
        c.put_blocks(keys, data)
        lease = c.lookup_leased(keys[:2])
        assert lease.hit_blocks == 2 and lease.lease_id
        ev = admin.Evict(admin_pb2.EvictRequest(all=True))
        assert (ev.blocks, ev.skipped_leased) == (2, 2)
        assert c.lookup(keys[:2]) == 2 and c.lookup(keys[2:]) == 0
        # Remove while leased: invisible at once, bytes intact until the lease ends.
        removed = pool.Remove(pool_pb2.RemoveRequest(keys=b"".join(keys[:2])))
        assert (removed.removed, removed.deferred) == (0, 2)
        assert c.lookup(keys[:1]) == 0
        assert used_bytes(admin) == 2 * BLOCK
        out = [bytearray(BLOCK), bytearray(BLOCK)]
        raw_copy(c, lease.locations, READ, lease.lease_id, [byte_view(o, writable=True) for o in out])
        assert [bytes(o) for o in out] == [data[0].tobytes(), data[1].tobytes()]
        assert c.release([lease.lease_id]) == 1
        assert used_bytes(admin) == 0


def test_forgotten_lease_expires(serve_factory):
    sp = serve_factory("--lease-ttl", "0.5")
    ns = fresh_namespace()
    keys = [os.urandom(16)]
    with stubs(sp.address) as (_, admin), Client(sp.address, ns) as c:
        c.put_blocks(keys, random_blocks(1))
        c.lookup_leased(keys)
        assert admin.Stats(common_pb2.StatsRequest()).active_leases == 1
        assert wait_for(lambda: admin.Stats(common_pb2.StatsRequest()).active_leases == 0)
        assert admin.Evict(admin_pb2.EvictRequest(all=True)).blocks == 1


def test_full_pool_evicts_lru_then_refuses_when_all_leased(serve_factory):
    # 256 KiB of DRAM holds 16 blocks of 16 KiB.
    sp = serve_factory("--dram", "256KiB", "--slab-bytes", "256KiB", "--eviction-policy", "lru")
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(40)]
    with Client(sp.address, ns) as c:
        for i in range(0, 32, 8):
            c.put_blocks(keys[i : i + 8], random_blocks(8, seed=i))
            time.sleep(0.01)
        # The oldest blocks made room for the newest: LRU evicted them.
        assert c.lookup(keys[24:32]) == 8
        assert c.lookup(keys[:8]) == 0
        stats = c.stats()
        assert stats.evictions >= 16 and stats.blocks <= 16
        # Lease everything resident; now nothing is evictable.
        resident = [k for k in keys[:32] if c.lookup([k])]
        lease = c.lookup_leased(resident)
        assert lease.hit_blocks == len(resident)
        free = 16 - len(resident)
        with pytest.raises(errors.PoolFull, match="nothing more is evictable"):
            c.put_blocks(keys[32 : 32 + free + 1], random_blocks(free + 1))
        # Nothing was lost and the pool works again once the lease ends.
        assert c.lookup(resident) == len(resident)
        c.release([lease.lease_id])
        assert c.put_blocks(keys[32:40], random_blocks(8)).written == 8


def test_watermark_eviction_keeps_usage_below_high(serve_factory):
    sp = serve_factory("--dram", "256KiB", "--slab-bytes", "256KiB", "--high-watermark", "0.5", "--low-watermark", "0.25")
    ns = fresh_namespace()
    with Client(sp.address, ns) as c:
        c.put_blocks([os.urandom(16) for _ in range(10)], random_blocks(10))
        stats = c.stats()
        assert stats.tiers[0].used_bytes <= 0.5 * stats.tiers[0].capacity_bytes
        assert stats.blocks == 4  # evicted down to the 25% low watermark
