"""A read that outlives its lease fails with LeaseExpired; its bytes are never returned as good.

The reader here is an AsyncClient whose event loop another task stalls (as a GC pause or a
busy engine would) for longer than the server's lease, while the read is in flight.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from kvpool import AsyncClient
from kvpool.errors import FailedPrecondition, LeaseExpired
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, tokens

TTL = 0.5


@pytest.mark.parametrize("call", ["fetch", "get_blocks"])
def test_a_read_that_outlives_its_lease_is_an_error(serve_factory, call):
    sp = serve_factory("--lease-ttl", str(TTL))
    ns = fresh_namespace()
    toks, data = tokens(4 * SMALL.block_tokens, seed=8), random_blocks(4, seed=8)
    keys = ns.keys(toks)

    async def main():
        async with AsyncClient(sp.address, ns) as c:
            await c.publish(toks, data)

            def read():
                out = np.zeros_like(data)
                return c.fetch(toks, out) if call == "fetch" else c.get_blocks(keys, out)

            await read()  # in time: fine

            async def stall():
                await asyncio.sleep(0)
                time.sleep(2 * TTL)  # blocks the loop the read runs on

            got = await asyncio.gather(read(), stall(), return_exceptions=True)
            return got[0]

    result = asyncio.run(main())
    assert isinstance(result, LeaseExpired), result
    assert isinstance(result, FailedPrecondition)  # in the tree under FAILED_PRECONDITION
    assert "outlived their read lease" in str(result) and "--lease-ttl" in str(result)
