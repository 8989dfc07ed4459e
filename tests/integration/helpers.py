"""Namespaces and data shared by the integration tests."""

from __future__ import annotations

import itertools
import time

import numpy as np

from kvpool import KVLayout, Namespace

#: 2 layers x K/V x 16 tokens x 2 heads x 64 dim x fp16 = 16 KiB blocks.
SMALL = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
_counter = itertools.count()


def fresh_namespace(layout: KVLayout = SMALL, **kw) -> Namespace:
    """A namespace no other test uses, so tests sharing a server never see each other's blocks."""
    return Namespace(model=f"test-model-{next(_counter)}", layout=layout, **kw)


def random_blocks(n: int, layout: KVLayout = SMALL, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, layout.block_bytes), dtype=np.uint8)


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 32000, size=n).tolist()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def raw_copy(client, locations, op: int, grant_id: str, buffers: list) -> None:
    """Move bytes through a client's data plane alone, outside the put/get protocol (to show
    what the protocol around it guarantees). ``op`` is kvpool.transport.base.READ or WRITE."""
    from kvpool.client.shares import plan
    from kvpool.transport.base import WRITE

    for p in plan(locations, client._async.transports, op, grant_id, 1, {}):
        mine = [buffers[i] for i in p.index]
        (p.transport.write if op == WRITE else p.transport.read)(p.share, mine)
