"""The client against a real `kvpool serve`: block and token level, sync and async."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch

from kvpool import AsyncClient, Client, KVLayout, Namespace, errors
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, tokens, wait_for


def test_put_get_round_trip_bytes_numpy_and_torch(server):
    ns = fresh_namespace()
    data = random_blocks(3)
    keys = [os.urandom(16) for _ in range(3)]
    as_torch = torch.from_numpy(data[2].copy()).view(torch.float16)
    with Client(server.address, ns) as c:
        res = c.put_blocks(keys, [data[0].tobytes(), data[1], as_torch])
        assert (res.written, res.present, res.in_flight) == (3, 0, 0)
        got = c.get_blocks(keys)
        for i in range(3):
            assert bytes(got[i]) == data[i].tobytes()
        # Into caller buffers: a bytearray, a numpy array and a torch tensor.
        outs = [bytearray(SMALL.block_bytes), np.zeros(SMALL.block_bytes, np.uint8),
                torch.zeros(SMALL.block_bytes // 2, dtype=torch.float16)]
        c.get_blocks(keys, outs)
        assert bytes(outs[0]) == data[0].tobytes()
        assert np.array_equal(outs[1], data[1])
        assert torch.equal(outs[2].view(torch.uint8), as_torch.view(torch.uint8))  # NaN-safe


def test_put_deduplicates_present_blocks(server):
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(4)]
    with Client(server.address, ns) as c:
        assert c.put_blocks(keys[:2], random_blocks(2)).written == 2
        res = c.put_blocks(keys, random_blocks(4, seed=1))
        assert (res.written, res.present) == (2, 2)
        # The first writer's bytes stand: deduplication never overwrites.
        assert bytes(c.get_blocks(keys[:1])[0]) == random_blocks(2)[0].tobytes()


def test_publish_match_fetch_token_level(server):
    ns = fresh_namespace()
    toks = tokens(16 * 5 + 7)  # 5 full blocks and a partial one, which is never keyed
    kv = torch.randn(5, *SMALL.shape).to(torch.float16)
    with Client(server.address, ns) as c:
        assert c.match(toks) == 0
        assert c.publish(toks, kv).written == 5
        assert c.match(toks) == 5
        # A prompt sharing 3 full blocks of prefix matches exactly 3.
        other = toks[: 16 * 3] + [7] * 40
        assert c.match(other) == 3
        out = torch.zeros_like(kv)
        assert c.fetch(toks, out) == 5
        assert torch.equal(out, kv)
        out2 = torch.zeros(4, *SMALL.shape, dtype=torch.float16)
        assert c.fetch(other, out2) == 3
        assert torch.equal(out2[:3], kv[:3]) and not out2[3].any()


def test_get_missing_raises_block_not_found_or_returns_none(server):
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(3)]
    with Client(server.address, ns) as c:
        c.put_blocks(keys[:1], random_blocks(1))
        with pytest.raises(errors.BlockNotFound, match="1 of 2 blocks are not in the pool"):
            c.get_blocks(keys[:2])
        got = c.get_blocks(keys, allow_missing=True)
        assert got[1] is None and got[2] is None and bytes(got[0]) == random_blocks(1)[0].tobytes()
        # Leases are released in the background, promptly.
        assert wait_for(lambda: c.stats().active_leases == 0)


def test_remove_makes_blocks_unreadable(server):
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(2)]
    with Client(server.address, ns) as c:
        c.put_blocks(keys, random_blocks(2))
        assert c.remove(keys[:1]) == 1
        assert c.lookup(keys) == 0
        assert c.get_blocks(keys, allow_missing=True)[0] is None


def test_async_client_concurrent_publishers(server):
    ns = fresh_namespace()
    toks = tokens(16 * 8, seed=3)
    kv = random_blocks(8, seed=3)

    async def run():
        async with AsyncClient(server.address, ns) as a, AsyncClient(server.address, ns) as b:
            r1, r2 = await asyncio.gather(a.publish(toks, kv), b.publish(toks, kv))
            # Each block is written by exactly one of them; the other skips it.
            assert r1.written + r2.written == 8
            assert r1.written + r1.present + r1.in_flight == 8
            out = np.zeros_like(kv)
            assert await a.fetch(toks, out) == 8
            assert np.array_equal(out, kv)

    asyncio.run(run())


def test_engine_hashes_and_namespaces_are_isolated(server):
    layout = SMALL
    a = Namespace("model-a", layout)
    b = Namespace("model-b", layout)
    toks = tokens(32, seed=4)
    with Client(server.address) as c:
        c.publish(toks, random_blocks(2), namespace=a)
        assert c.match(toks, namespace=a) == 2
        assert c.match(toks, namespace=b) == 0
        keys = a.engine_keys([b"vllm-hash-1", 12345])
        c.put_blocks(keys, random_blocks(2), namespace=a)
        assert c.lookup(keys, namespace=a) == 2


def test_client_reregisters_after_master_restart(serve_factory):
    ns = fresh_namespace()
    first = serve_factory()
    with Client(first.address, ns) as c:
        c.publish(tokens(32), random_blocks(2))
    first.stop()
    # A new master has never seen the namespace; the client registers it again by itself.
    second = serve_factory()
    with Client(second.address, ns) as c:
        assert c.match(tokens(32)) == 0
        assert c.publish(tokens(32), random_blocks(2)).written == 2


def test_empty_batches_are_no_ops(server):
    with Client(server.address, fresh_namespace()) as c:
        assert c.put_blocks([], []).written == 0
        assert c.get_blocks([]) == []
        assert c.lookup([]) == 0
        assert c.match([1, 2, 3]) == 0        # no full block: no RPC, no keys


def test_no_namespace_is_an_actionable_error(server):
    with Client(server.address) as c:
        with pytest.raises(errors.InvalidArgument, match="no namespace"):
            c.match([1, 2, 3])


def test_sync_client_is_a_facade_over_async():
    # Every blocking method wraps the AsyncClient coroutine of the same name.
    for name in ("put_blocks", "get_blocks", "match", "publish", "fetch", "lookup", "remove", "stats"):
        assert getattr(Client, name).__wrapped__ is getattr(AsyncClient, name)
    assert asyncio.iscoroutinefunction(AsyncClient.put_blocks)


def test_unreachable_server_is_unavailable():
    ns = fresh_namespace()
    with Client("127.0.0.1:1", ns, timeout=2) as c:
        with pytest.raises(errors.Unavailable):
            c.match(tokens(16))
