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

Who sees which events (docs/design.md §3c). Every event is tagged with the tenant of the
blocks it names, and there are two ways to read them:

* the ZMQ PUB socket carries every tenant's events and authenticates nobody: it is for the
  pool operator's trusted routers. It binds ``--events-host`` (default ``127.0.0.1``); a
  non-loopback address is refused unless ``--insecure`` says every host that reaches it is
  trusted (the rule the gRPC port follows);
* ``Admin/SubscribeEvents`` (gRPC, server streaming) is token-checked: a ``client`` token
  receives only its own tenant's events, an ``admin`` token (or anyone on a server without
  tokens) every tenant's. Each message is an :class:`EventBatch` whose ``payload`` is the same
  msgpack as on ZMQ and whose ``seq`` counts the batches sent to that subscriber, so a gap
  means this subscriber lost batches (it read too slowly), never that another tenant had some.
  ``AllBlocksCleared`` names no block and goes to everyone.

Events are queued by the index's observer calls and sent in batches by one task, at most
every ``interval`` seconds, off the RPC path. With neither a ZMQ socket nor a subscriber the
observer calls return at once, so a master that publishes nothing pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import msgpack

__all__ = ["EventPublisher", "EventSubscription", "MEDIUM", "ALL_TENANTS"]

log = logging.getLogger("kvpool.events")

MEDIUM = {"hbm": "GPU", "dram": "CPU", "nvme": "DISK"}
_MAX_EVENTS = 1024
#: The tag of an event every subscriber may see (it names no block).
ALL_TENANTS = None
#: Batches a gRPC subscriber may have waiting; past that it loses batches (a seq gap).
_SUBSCRIBER_BACKLOG = 256


@dataclass(eq=False)
class EventSubscription:
    """One ``SubscribeEvents`` stream: the batches for ``tenant`` (None: every tenant's)."""

    tenant: str | None
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(_SUBSCRIBER_BACKLOG))
    seq: int = 0
    lost: int = 0

    def sees(self, tag: str | None) -> bool:
        return tag is ALL_TENANTS or self.tenant is None or tag == self.tenant


class EventPublisher:
    """Index observer that turns block changes into KV event batches for the ZMQ socket (when
    ``port`` >= 0), the Redis stream (when ``redis`` is set) and gRPC subscribers."""

    def __init__(self, host: str, port: int, index, *, topic: str = "", interval: float = 0.05) -> None:
        self.index = index
        self.topic = topic.encode()
        self.interval = interval
        self._ctx = self._sock = None
        self.port = -1
        if port >= 0:
            self._bind(host, port)
        #: (tenant, event) pairs waiting for the sending task.
        self._events: list = []
        self._subs: set[EventSubscription] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.seq = 0
        self.redis = None
        self.stream = ""
        self.published = 0

    def _bind(self, host: str, port: int) -> None:
        import zmq
        import zmq.asyncio

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

    @property
    def active(self) -> bool:
        """Whether anyone reads the events (else the observer calls drop them at once)."""
        return self._sock is not None or bool(self._subs)

    # gRPC subscribers -------------------------------------------------------------------

    def subscribe(self, tenant: str | None) -> EventSubscription:
        sub = EventSubscription(tenant)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: EventSubscription) -> None:
        self._subs.discard(sub)

    # the index's observer -------------------------------------------------------------

    def _info(self, ns_id: str):
        return self.index.namespaces.get(ns_id)

    def stored(self, entries) -> None:
        if not self.active:
            return
        groups: dict[tuple[str, str], list[bytes]] = {}
        for e in entries:
            groups.setdefault((e.ns, e.tier), []).append(e.client_key)  # not the tenant-scoped key
        for (ns, tier), keys in groups.items():
            info = self._info(ns)
            block_size = info.namespace.layout.block_tokens if info is not None else 0
            tenant = info.tenant if info is not None else ""
            self._add(tenant, ["BlockStored", keys, None, [], block_size, None, MEDIUM.get(tier, tier)])

    def removed(self, entries) -> None:
        if not self.active:
            return
        groups: dict[tuple[str, str], list[bytes]] = {}
        for e in entries:
            info = self._info(e.ns)
            tenant = info.tenant if info is not None else ""
            groups.setdefault((tenant, MEDIUM.get(e.tier, e.tier)), []).append(e.client_key)
        for (tenant, medium), keys in groups.items():
            self._add(tenant, ["BlockRemoved", keys, medium])

    def node_lost(self, entries) -> None:
        self.removed(entries)

    def namespace(self, ns) -> None:
        pass

    def cleared(self) -> None:
        self._add(ALL_TENANTS, ["AllBlocksCleared"])

    def _add(self, tenant: str | None, event) -> None:
        self._events.append((tenant, event))
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
                tagged, self._events = self._events[:_MAX_EVENTS], self._events[_MAX_EVENTS:]
                try:
                    await self._send(tagged)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("publishing %d KV events failed", len(tagged))

    async def _send(self, tagged) -> None:
        ts = time.time()
        for sub in tuple(self._subs):
            self._deliver(sub, ts, [ev for tag, ev in tagged if sub.sees(tag)])
        if self._sock is None:
            return
        payload = msgpack.packb([ts, [ev for _, ev in tagged]], use_bin_type=True)
        self.seq += 1
        await self._sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload])
        self.published += len(tagged)
        if self.redis is not None:
            try:
                await self.redis.xadd(self.stream, {"seq": self.seq, "batch": payload}, maxlen=100_000,
                                      approximate=True)
            except Exception as exc:  # Redis down: the ZMQ subscribers still have it
                log.debug("KV events not appended to Redis: %s", exc)

    @staticmethod
    def _deliver(sub: EventSubscription, ts: float, events: list) -> None:
        if not events:
            return  # nothing of this tenant's: no batch, and no seq number spent
        sub.seq += 1
        try:
            sub.queue.put_nowait((sub.seq, msgpack.packb([ts, events], use_bin_type=True)))
        except asyncio.QueueFull:
            sub.lost += 1  # the subscriber sees the gap in seq

    def end_streams(self) -> None:
        """Ends every gRPC subscriber's stream (the master is stopping)."""
        for sub in tuple(self._subs):  # None ends a stream
            while sub.queue.full():
                sub.queue.get_nowait()
            sub.queue.put_nowait(None)
            self._subs.discard(sub)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.end_streams()
        if self._sock is not None:
            self._sock.close(0)
            self._ctx.term()
