"""Redis-backed metadata of a master (``kvpool master --redis redis://…``).

What is kept in Redis, under ``PREFIX`` (``--redis-prefix``, default ``kvpool``):

* ``PREFIX:blocks``     hash: block key (16 bytes) -> where it was committed: tier, slot,
                        size, checksum, node name, node incarnation, namespace id;
* ``PREFIX:namespaces`` hash: namespace id -> the namespace and its settings as JSON: the
                        Namespace's fields and ``"settings": {"replicas": N}`` (0: the pool
                        default), rewritten whenever a setting changes
                        (:func:`namespace_to_json`); a record without ``settings`` (written
                        before they were kept) loads with none set;
* ``PREFIX:nodes``      hash: node name -> control address and incarnation;
* ``PREFIX:tenants``    hash: tenant (``""``: the default tenant) -> its settings as JSON,
                        ``{"quotas": {"dram": bytes, "hbm": bytes}}`` (:meth:`take_tenant_settings`);
* ``PREFIX:removed``    hash: one field per tombstone of a removed block's copy that its node
                        has not yet confirmed removing (:mod:`kvpool.master.tombstones`), value
                        ``1``; written in the same batch as the deletion of the block's record;
* ``PREFIX:epoch`` and ``PREFIX:leader``: the fencing epoch and the leader's lease
  (:mod:`kvpool.master.leader`).

Protocol of writes:

* The index tells this store of blocks stored and removed (``BlockIndex.observers``); that
  only marks the key dirty in a dict (a later change of a key replaces an earlier one), so
  the put path never waits on Redis per block.
* One writer task flushes the dirty keys: one Lua call per 4,096 changes, all calls of a
  flush in one pipeline, so a flush is one round trip. While a flush is in flight, the
  changes of every commit that arrives meanwhile gather for the next one (coalesced across
  commits). The script first checks that ``PREFIX:epoch`` still holds this master's epoch:
  a deposed master cannot write.
* With ``--redis-commit background``, ``PutCommit`` is answered at once: Redis is off the
  client's critical path. **Backpressure**: while Redis answers and more than
  ``max_backlog`` changes (``--redis-backlog``) wait to be written, a commit is answered
  only after a flush has taken the backlog; a Redis that stops answering is declared down
  after the socket timeout (2 s), which ends the wait.
* With ``--redis-commit wait`` (the default), ``PutCommit`` is answered after the flush that
  carries its blocks (group commit: concurrent commits share one round trip), or after
  ``flush_timeout`` at most. When no flush is running, the committer flushes itself (no hop
  to the writer task).
* When Redis is down, the pool keeps serving from memory: commits are answered without
  waiting, health and metrics say the store is down, and the writer retries. Once Redis
  answers again, the writer rewrites the whole index (a Redis that restarted lost it).

**What a failover can lose.** A master taking over serves the blocks Redis lists (once
their node confirms them) and the blocks its nodes report (the changes they applied, see
:mod:`kvpool.master.remote`). With background commits, a block whose commit was answered
but that was in neither place when the leader died is forgotten: its change was still in the
backlog (the writer flushes as soon as a commit lands: about one Redis round trip) *and* its
node had not yet applied it (the next heartbeat answer). Forgotten means a miss, never wrong
bytes. A writer that waited even 2 ms before flushing made tools/bench_failover.py lose the
put acknowledged just before its kill, every run; without a linger, 1 run in 10 still lost it
(a flush still in flight held the next one back). Hence ``wait`` is the default: with it,
nothing whose commit was answered is forgotten while Redis is up.

On start, a master loads the namespaces with their settings and the block records
(:meth:`load`), and the tombstones (:meth:`load_tombstones`); a block is served again only
when its node registers with the same incarnation and the node confirms that the slot holds
bytes with the recorded checksum (``NodeControl.VerifyBlocks``), and a block a node reports
is not served when a tombstone names it (:mod:`kvpool.master.tombstones`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import struct
import time
from dataclasses import dataclass

from kvpool.wire import TIER_CODES, TIER_NAMES

__all__ = ["RedisMeta", "BlockRecord", "Fenced", "MetaCollector", "NamespaceSettings"]

log = logging.getLogger("kvpool.metastore")

_HEAD = struct.Struct("<BQQQ")  # tier code, offset, size, checksum
_OPS_PER_CALL = 4096

# KEYS: epoch, then the hashes. ARGV: epoch, then (hash number, field, value) triples;
# an empty value deletes the field.
_WRITE = """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  return redis.error_reply('FENCED epoch is ' .. tostring(current))
end
local n = 0
for i = 2, #ARGV, 3 do
  local h = KEYS[tonumber(ARGV[i])]
  if ARGV[i + 2] == '' then redis.call('HDEL', h, ARGV[i + 1]) else redis.call('HSET', h, ARGV[i + 1], ARGV[i + 2]) end
  n = n + 1
end
return n
"""

_BLOCKS, _NAMESPACES, _NODES, _TENANTS, _REMOVED = 2, 3, 4, 5, 6


class Fenced(Exception):
    """Redis holds a newer epoch: another master leads now."""


@dataclass(frozen=True)
class BlockRecord:
    key: bytes
    tier: str
    offset: int
    size: int
    checksum: int
    node: str
    incarnation: str
    namespace_id: str


def encode_block(entry, node) -> bytes:
    slot = entry.slot
    tail = f"{node.name}\0{node.incarnation}\0{entry.ns}".encode()
    return _HEAD.pack(TIER_CODES[entry.tier], slot.offset, slot.size, entry.checksum) + tail


def decode_block(key: bytes, value: bytes) -> BlockRecord:
    tier, offset, size, checksum = _HEAD.unpack_from(value)
    node, incarnation, ns = value[_HEAD.size:].decode().split("\0")
    return BlockRecord(key, TIER_NAMES[tier], offset, size, checksum, node, incarnation, ns)


class RedisMeta:
    def __init__(self, url: str, prefix: str, index, *, flush_timeout: float = 1.0,
                 retry_interval: float = 0.5, max_backlog: int = 65536, wait_for_redis: bool = False) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self.index = index
        self.flush_timeout = flush_timeout
        self.retry_interval = retry_interval
        self.max_backlog = max_backlog
        self.wait_for_redis = wait_for_redis
        #: Commits that waited for the writer (backpressure).
        self.backpressured = 0
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # One immediate retry (a pooled connection that a Redis restart closed), no backoff:
        # redis-py's default (10 retries, exponential backoff) would stall commits and the
        # lease for many seconds while Redis is away; the writer and the lease retry themselves.
        self.redis = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0,
                                             retry=Retry(NoBackoff(), 1))
        self._script = self.redis.register_script(_WRITE)
        self.keys = [f"{prefix}:epoch", f"{prefix}:blocks", f"{prefix}:namespaces", f"{prefix}:nodes",
                     f"{prefix}:tenants", f"{prefix}:removed"]
        self.epoch = 0
        #: Dirty keys: block key -> index entry (write it) or None (delete it).
        self._dirty: dict[bytes, object] = {}
        self._other: list[tuple[int, bytes | str, bytes]] = []  # namespaces, nodes
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flushed: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self.up = True
        self.down_since: float | None = None
        self.last_error = ""
        self.resyncs = 0
        self.writes = 0
        self._resync = False
        #: Set when Redis holds a newer epoch (the leader module decides what that means).
        self.on_fenced = None
        #: The master's tombstones (kvpool.master.tombstones), rewritten with the rest after
        #: an outage; None: no node outlives this master (``kvpool serve`` alone).
        self.removals = None

    # ------------------------------------------------------------------ the index's observer

    def stored(self, entries) -> None:
        dirty = self._dirty
        for entry in entries:
            dirty[entry.key] = entry
        self._wake.set()

    def removed(self, entries) -> None:
        dirty = self._dirty
        for entry in entries:
            dirty[entry.key] = None
        self._wake.set()

    def node_lost(self, entries) -> None:
        # The records stay: if the node comes back as the same process, they are reconciled
        # with it (kvpool.master.remote); a new incarnation makes them go then.
        pass

    def namespace(self, info) -> None:
        # Queued like a block change: it goes out with the next flush, beside the commits.
        self._other.append((_NAMESPACES, info.namespace.id, namespace_to_json(info)))
        self._wake.set()

    def node_joined(self, name: str, address: str, incarnation: str) -> None:
        self._other.append((_NODES, name, f"{address}\0{incarnation}".encode()))
        self._wake.set()

    def tombstones(self, put, drop) -> None:
        """Tombstones made and ended (their fields); queued like the block changes they go
        with, so a removal and its tombstones reach Redis in the same flush."""
        other = self._other
        other.extend((_REMOVED, f, b"") for f in drop)
        other.extend((_REMOVED, f, b"1") for f in put)
        self._wake.set()

    def forget(self, keys) -> None:
        """Records that reconciliation found stale (their node restarted or lost them)."""
        for key in keys:
            self._dirty.setdefault(key, None)
        self._wake.set()

    # ------------------------------------------------------------------ commits

    @property
    def backlog(self) -> int:
        """Changes not yet written to Redis."""
        return len(self._dirty) + len(self._other)

    async def admit(self) -> None:
        """What a commit awaits before it is answered (see the module docstring): nothing
        (background), backpressure once the backlog passes ``max_backlog``, or the flush that
        carries it (``wait_for_redis``)."""
        if self.wait_for_redis:
            await self.durable()
            return
        if self.up and self.backlog > self.max_backlog:
            self.backpressured += 1
        while self.up and self.backlog > self.max_backlog:
            if self._flushed is None:
                self._flushed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._flushed)  # a flush, or Redis declared down, resolves it

    async def durable(self) -> None:
        """Wait for the flush that carries every change made so far (group commit), at most
        ``flush_timeout``; at once when Redis is down (the pool serves from memory then)."""
        if not self.up or not self.backlog:
            return
        if self._task is not None and not self._lock.locked():
            try:
                await asyncio.wait_for(self._flush_locked(), self.flush_timeout)
            except asyncio.TimeoutError:
                pass
            return
        if self._flushed is None:
            self._flushed = asyncio.get_running_loop().create_future()
        waiter = self._flushed
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.flush_timeout)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------------ the writer

    def start(self, epoch: int) -> None:
        self.epoch = epoch
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Write what is left (a master stopped on purpose loses nothing), then close."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            if self.up and self.backlog:
                try:
                    await asyncio.wait_for(self._flush_locked(), self.flush_timeout)
                except asyncio.TimeoutError:
                    log.warning("stopping with %d changes not written to Redis", self.backlog)
        await self.redis.aclose()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not await self._flush_locked():
                await asyncio.sleep(self.retry_interval)
                self._wake.set()

    async def _flush_locked(self) -> bool:
        """One flush under the lock (the writer's, or a committer's); False if Redis failed."""
        async with self._lock:
            if not self._dirty and not self._other and not self._resync:
                self._release_waiters()
                return True
            try:
                if self._resync:
                    await self._rewrite_all()
                await self._flush()
                if not self.up:
                    log.info("Redis %s answers again; metadata caught up (%d blocks)", self.url, self.index.block_count)
                self.up, self.down_since, self.last_error = True, None, ""
                return True
            except Fenced as exc:
                self._went_down(f"fenced: {exc}")
                if self.on_fenced is not None:
                    self.on_fenced()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused, timeouts, a Redis that restarted
                self._went_down(f"{type(exc).__name__}: {exc}")
            self._wake.set()  # the writer retries
            return False

    def mark_down(self, why: str) -> None:
        """Redis did not answer someone else (the lease): retry, and rewrite it all once back."""
        self._went_down(why)
        self._wake.set()

    def mark_reset(self) -> None:
        """Redis restarted empty: rewrite everything."""
        self._resync = True
        self._wake.set()

    def _went_down(self, why: str) -> None:
        if self.up:
            log.warning("Redis %s unavailable (%s): serving from memory, catching up when it is back", self.url, why)
            self.down_since = time.time()
        self.up = False
        self.last_error = why
        self._resync = True  # a Redis that restarted lost everything: write it all again
        self._release_waiters()

    def _release_waiters(self) -> None:
        waiter, self._flushed = self._flushed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        other, self._other = self._other, []
        waiter, self._flushed = self._flushed, None
        try:
            ops: list[tuple[int, bytes | str, bytes]] = list(other)
            nodes = self.index.nodes
            for key, entry in dirty.items():
                if entry is None or entry.doomed:
                    ops.append((_BLOCKS, key, b""))
                else:
                    node = nodes.get(entry.node_id)
                    ops.append((_BLOCKS, key, encode_block(entry, node) if node is not None else b""))
            await self._write(ops)
        except BaseException:
            # Nothing is lost: put the changes back under any newer ones.
            for key, entry in dirty.items():
                self._dirty.setdefault(key, entry)
            self._other[:0] = other
            if waiter is not None:
                self._flushed = self._flushed or waiter
            raise
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _write(self, ops) -> None:
        import redis

        if not ops:
            return
        calls = []
        for start in range(0, len(ops), _OPS_PER_CALL):
            args: list = [self.epoch]
            for h, field, value in ops[start : start + _OPS_PER_CALL]:
                args.extend((h, field, value))
            calls.append(args)
        try:
            if len(calls) == 1:  # the common case (a commit or a few): no pipeline object to build
                await self._script(keys=self.keys, args=calls[0])
            else:
                pipe = self.redis.pipeline(transaction=False)
                for args in calls:
                    await self._script(keys=self.keys, args=args, client=pipe)
                await pipe.execute()
        except redis.ResponseError as exc:
            if "FENCED" in str(exc):
                raise Fenced(str(exc)) from None
            raise
        self.writes += len(ops)

    async def _rewrite_all(self) -> None:
        """Write every committed block and namespace again (after Redis was down)."""
        self.resyncs += 1
        snapshot = list(self.index.entries())
        ns_ops = [(_NAMESPACES, ns_id, namespace_to_json(info)) for ns_id, info in self.index.namespaces.items()]
        ns_ops += [(_TENANTS, tenant, tenant_to_json(quotas)) for tenant, quotas in self.index.config.quotas.items()]
        if self.removals is not None:
            ns_ops += [(_REMOVED, f, b"1") for f in self.removals.fields()]
        for entry in snapshot:
            self._dirty.setdefault(entry.key, entry)
        self._other[:0] = ns_ops
        self._resync = False

    # ------------------------------------------------------------------ loading

    async def load(self) -> tuple[list, list[BlockRecord], list[str]]:
        """Namespaces with their settings (``(Namespace, NamespaceSettings)`` pairs), block
        records and node names in Redis (a master taking over)."""
        namespaces = []
        for value in (await self.redis.hgetall(self.keys[_NAMESPACES - 1])).values():
            try:
                namespaces.append(namespace_from_json(value))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.warning("ignoring an unreadable namespace record in Redis: %s", exc)
        blocks = []
        async for key, value in self.redis.hscan_iter(self.keys[_BLOCKS - 1], count=10000):
            try:
                blocks.append(decode_block(key, value))
            except (struct.error, ValueError, KeyError):
                log.warning("ignoring an unreadable block record %r in Redis", key[:16])
        nodes = [name.decode() for name in await self.redis.hkeys(self.keys[_NODES - 1])]
        return namespaces, blocks, nodes

    async def load_tombstones(self) -> list[bytes]:
        """The tombstones a master before this one wrote (kvpool.master.tombstones)."""
        return list(await self.redis.hkeys(self.keys[_REMOVED - 1]))

    async def take_tenant_settings(self, configured: dict[str, dict[str, int]] | None) -> dict[str, dict[str, int]]:
        """The pool's quotas for a master that takes over (tenant -> tier -> bytes).

        A master started with ``--quotas`` (``configured``) makes them the pool's: they replace
        what Redis holds, written with its first flush. A master started without takes those
        Redis holds, so a standby enforces what the leader before it did.
        """
        raw = await self.redis.hgetall(self.keys[_TENANTS - 1])
        stored: dict[str, dict[str, int]] = {}
        for tenant, value in raw.items():
            name = tenant.decode()
            try:
                stored[name] = tenant_from_json(value)
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("ignoring unreadable settings of tenant %r in Redis: %s", name, exc)
        if configured is None:
            return stored
        for tenant in stored.keys() - configured.keys():
            self._other.append((_TENANTS, tenant, b""))
        for tenant, quotas in configured.items():
            if stored.get(tenant) != quotas:
                self._other.append((_TENANTS, tenant, tenant_to_json(quotas)))
        if stored and stored != configured:
            log.info("--quotas replace the tenant settings in Redis")
        self._wake.set()
        return configured

    def health(self) -> str:
        if self.up:
            return f"redis up ({self.url})"
        since = time.strftime("%H:%M:%S", time.gmtime(self.down_since or time.time()))
        return f"redis down since {since} UTC ({self.last_error}); serving from memory, {self.backlog} changes to write"


@dataclass(frozen=True)
class NamespaceSettings:
    """What a namespace's record keeps beside its identity: the settings an operator or a
    client chose for it (kvpool.master.index.NamespaceInfo), 0 meaning "the pool default"."""

    replicas: int = 0


def namespace_to_json(info) -> bytes:
    """The record of a namespace (a NamespaceInfo): its identity and its settings."""
    d = dataclasses.asdict(info.namespace)
    d["settings"] = dataclasses.asdict(NamespaceSettings(replicas=info.replicas))
    return json.dumps(d, sort_keys=True).encode()


def namespace_from_json(data: bytes):
    """``(Namespace, NamespaceSettings)`` from a record; ValueError (or TypeError, KeyError)
    if it cannot be read. Settings out of range raise too: a master must not guess a number
    of copies."""
    from kvpool.identity import Namespace
    from kvpool.layout import KVLayout
    from kvpool.master.index import MAX_REPLICAS

    d = json.loads(data)
    settings = NamespaceSettings(**d.pop("settings", {}))
    if type(settings.replicas) is not int or not 0 <= settings.replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas {settings.replicas!r}: want 0 (the pool default) to {MAX_REPLICAS}")
    return Namespace(layout=KVLayout(**d.pop("layout")), **d), settings


def tenant_to_json(quotas: dict[str, int]) -> bytes:
    return json.dumps({"quotas": quotas}, sort_keys=True).encode()


def tenant_from_json(data: bytes) -> dict[str, int]:
    """A tenant's quotas from its record; ValueError if they are not tier -> positive bytes."""
    quotas = json.loads(data).get("quotas", {})
    if not all(tier in ("dram", "hbm") and type(n) is int and n > 0 for tier, n in quotas.items()):
        raise ValueError(f"quotas {quotas!r}: want dram/hbm -> positive bytes")
    return dict(quotas)


class MetaCollector:
    """Prometheus gauges of the metadata store and the lease (registered with Redis only)."""

    def __init__(self, meta: RedisMeta, lease) -> None:
        self.meta, self.lease = meta, lease

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("kvpool_metadata_store_up", "1 when Redis answers; 0: serving from memory, "
                                "catching up later", value=1 if self.meta.up else 0)
        yield GaugeMetricFamily("kvpool_metadata_backlog", "Changes not yet written to Redis",
                                value=self.meta.backlog)
        yield CounterMetricFamily("kvpool_metadata_backpressured", "Commits that waited for the Redis writer "
                                  "(--redis-backlog)", value=self.meta.backpressured)
        yield CounterMetricFamily("kvpool_metadata_writes", "Block and namespace changes written to Redis",
                                  value=self.meta.writes)
        yield CounterMetricFamily("kvpool_metadata_resyncs", "Full rewrites of the index to Redis after an outage",
                                  value=self.meta.resyncs)
        yield GaugeMetricFamily("kvpool_leader", "1 while this master leads", value=1 if self.lease.valid() else 0)
        yield GaugeMetricFamily("kvpool_fencing_epoch", "This master's fencing epoch", value=self.lease.epoch)
