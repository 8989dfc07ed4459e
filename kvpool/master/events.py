"""KV events for routers: what the pool holds, published as vLLM-style KV event batches.

A KV-aware router (llm-d's indexer, Dynamo's router, a custom one) subscribes to the
master's ZMQ PUB socket (``kvpool master --events-port PORT``) and learns which blocks the
pool holds, as it does from vLLM engines. Wire format, as vLLM's KV events use it:

* each message is three ZMQ frames: the topic (``--events-topic``, default empty), an 8-byte
  big-endian sequence number (a gap means the subscriber missed batches), and the payload;
* the payload is msgpack of an array ``[ts, [event, ...]]`` (``ts``: Unix seconds), each
  event an array whose first element names its kind:

  - ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``
  - ``["BlockRemoved", block_hashes, medium]``
  - ``["AllBlocksCleared"]``

``block_hashes`` are the pool's 16-byte block keys (docs/design.md §2; for blocks an engine
published with its own hashes, the key is ``xxh3_128(root || engine_hash)``, which a router
computes the same way). The master does not see tokens, so ``token_ids`` is empty,
``parent_block_hash`` and ``lora_id`` are nil; ``block_size`` is the namespace's tokens per
block and ``medium`` the tier of the copy ("GPU", "CPU" or "DISK").

A master publishes ``AllBlocksCleared`` when it starts leading (what an earlier master
announced may be stale), then ``BlockStored`` for every block it adopts from its nodes. With
Redis, each batch is also appended to the stream ``PREFIX:events`` (field ``batch``, capped
at about 100,000 entries), for consumers that want to catch up after a disconnect.

Events are queued by the index's observer calls and sent in batches by one task, at most
every ``interval`` seconds, off the RPC path.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack

__all__ = ["EventPublisher", "MEDIUM"]

log = logging.getLogger("kvpool.events")

MEDIUM = {"hbm": "GPU", "dram": "CPU", "nvme": "DISK"}
_MAX_EVENTS = 1024


class EventPublisher:
    def __init__(self, host: str, port: int, index, *, topic: str = "", interval: float = 0.05) -> None:
        import zmq
        import zmq.asyncio

        self.index = index
        self.topic = topic.encode()
        self.interval = interval
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        # A router that reads too slowly loses batches (and sees the gap in the sequence),
        # rather than making the master hold them without bound.
        self._sock.setsockopt(zmq.SNDHWM, 10000)
        bind_host = "*" if host in ("0.0.0.0", "") else host
        if port == 0:
            self.port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        else:
            self._sock.bind(f"tcp://{bind_host}:{port}")
            self.port = port
        self._events: list = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.seq = 0
        self.redis = None
        self.stream = ""
        self.published = 0

    # the index's observer -------------------------------------------------------------

    def _block_size(self, ns_id: str) -> int:
        info = self.index.namespaces.get(ns_id)
        return info.namespace.layout.block_tokens if info is not None else 0

    def stored(self, entries) -> None:
        groups: dict[tuple[str, str], list[bytes]] = {}
        for e in entries:
            groups.setdefault((e.ns, e.tier), []).append(e.key)
        for (ns, tier), keys in groups.items():
            self._add(["BlockStored", keys, None, [], self._block_size(ns), None, MEDIUM.get(tier, tier)])

    def removed(self, entries) -> None:
        groups: dict[str, list[bytes]] = {}
        for e in entries:
            groups.setdefault(MEDIUM.get(e.tier, e.tier), []).append(e.key)
        for medium, keys in groups.items():
            self._add(["BlockRemoved", keys, medium])

    def node_lost(self, entries) -> None:
        self.removed(entries)

    def namespace(self, ns) -> None:
        pass

    def cleared(self) -> None:
        self._add(["AllBlocksCleared"])

    def _add(self, event) -> None:
        self._events.append(event)
        self._wake.set()

    # sending --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.interval)  # let a burst of commits share a batch
            while self._events:
                events, self._events = self._events[:_MAX_EVENTS], self._events[_MAX_EVENTS:]
                try:
                    await self._send(events)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("publishing %d KV events failed", len(events))

    async def _send(self, events) -> None:
        payload = msgpack.packb([time.time(), events], use_bin_type=True)
        self.seq += 1
        await self._sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload])
        self.published += len(events)
        if self.redis is not None:
            try:
                await self.redis.xadd(self.stream, {"seq": self.seq, "batch": payload}, maxlen=100_000,
                                      approximate=True)
            except Exception as exc:  # Redis down: the ZMQ subscribers still have it
                log.debug("KV events not appended to Redis: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._sock.close(0)
        self._ctx.term()
