"""KV events for routers (``kvpool master --events-port``), read by a real subscriber process.

The master publishes vLLM-style KV event batches over ZMQ PUB (msgpack): ``BlockStored``
when blocks are committed, ``BlockRemoved`` when they go, ``AllBlocksCleared`` when a master
starts; with Redis, the same batches go to the ``PREFIX:events`` stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgpack

from kvpool import Client
from tests.integration.helpers import fresh_namespace, random_blocks, wait_for
from tests.integration.pool_procs import pool_procs  # noqa: F401  (fixture)
from tests.integration.redis_server import free_port, redis_server  # noqa: F401  (fixture)
from tests.integration.test_redis_metadata import stats

SUBSCRIBER = os.path.join(os.path.dirname(__file__), "kv_event_subscriber.py")


def test_a_subscriber_sees_blocks_stored_and_removed(pool_procs, redis_server):
    master, node = pool_procs
    port = free_port()
    m = master("--redis", redis_server.url, "--events-port", str(port), "--events-topic", "kvpool",
               ready=r"ready grpc=(\S+)")
    node(m.address, "node-a")
    assert wait_for(lambda: stats(m.address).nodes == 1, timeout=15)
    sub = subprocess.Popen([sys.executable, SUBSCRIBER, f"tcp://127.0.0.1:{port}", "30", "BlockRemoved"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.stdout.readline().strip() == "subscribed"
        ns = fresh_namespace()
        toks = list(range(16 * 3))
        with Client(m.address, ns) as c:
            c.publish(toks, random_blocks(3, seed=1))
            keys = ns.keys(toks)
            assert c.remove(keys[2:]) == 1
        out, err = sub.communicate(timeout=40)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 0, err
    batches = json.loads(out.strip().splitlines()[-1])
    events = [ev for b in batches for ev in b["events"]]
    assert all(b["topic"] == "kvpool" for b in batches)
    seqs = [b["seq"] for b in batches]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    stored = [ev for ev in events if ev[0] == "BlockStored"]
    removed = [ev for ev in events if ev[0] == "BlockRemoved"]
    assert stored == [["BlockStored", [k.hex() for k in keys], None, [], 16, None, "CPU"]]
    assert removed == [["BlockRemoved", [keys[2].hex()], "CPU"]]
    # The same batches, in Redis, for consumers that catch up later.
    entries = redis_server.client().xrange("kvpool:events")
    kinds = [ev[0] for _, fields in entries for ev in msgpack.unpackb(fields[b"batch"], raw=False)[1]]
    assert kinds[0] == "AllBlocksCleared" and "BlockStored" in kinds and kinds[-1] == "BlockRemoved"
