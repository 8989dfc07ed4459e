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

Protocol of writes (Redis 7.0 or later: ``BLMPOP``):

* The index tells this store of blocks stored and removed (``BlockIndex.observers``); that
  only marks the key dirty in a dict (a later change of a key replaces an earlier one), so
  the put path never waits on Redis per block.
* The dirty changes go out as Lua calls of at most 4,096 changes, packed straight into RESP
  (:meth:`RedisMeta._send`), on a **write connection that gets no replies** (``CLIENT REPLY
  OFF``, :mod:`kvpool.master.redis_pipeline`): written in order, never waited on, pipelined.
  A commit sends its own changes and those of every commit before it (no hop to a task);
  the writer task sends the rest (removals, nodes, namespaces) and reconnects. The script
  first checks that ``PREFIX:epoch`` still holds this master's epoch (a deposed master
  cannot write), applies the changes, then pushes the call's sequence number to
  ``PREFIX:acks:TOKEN`` (one list per connection, expiring a minute after its last push);
  if fenced, it pushes ``F`` and the epoch it found instead, and writes nothing.
* A second connection pops that list (``BLMPOP``): an acknowledgement confirms its call and
  every call before it (Redis runs one connection's calls in order). None for 2 s while a
  call waits for one (Redis stopped, a script refused for lack of memory, …) declares Redis
  down; so does a failed connection. Then every unacknowledged call's changes go again,
  under newer ones, on new connections, after a full rewrite (a Redis that restarted lost
  everything).
* Why no replies on the write connection: Redis drops a client at the first reply it fails
  to write, and with it every command of that client it has not read yet. A master killed
  with calls in flight leaves them in Redis's socket; with replies on, Redis ran 1,755 to
  5,654 of 100,000 pipelined commands, with replies off all of them, and
  tests/integration/test_redis_metadata.py (16 calls, about 70 KB, unanswered at the kill)
  fails with replies on (322 of 514 records arrived). A connection that never receives
  anything is also always closed in order by the kernel (a FIN after the data), never
  reset: Linux resets a socket closed with unread data in it and drops what it had not sent.
* When ``PutCommit`` is answered (``--redis-commit``):

  - ``sent`` (the default): once the call that carries its blocks is in the kernel's socket
    buffer (the transport keeps no bytes of its own), and only while the lease was renewed
    within two thirds of its TTL (:meth:`LeaderLease.fresh`); otherwise as ``wait``.
  - ``wait``: once that call is acknowledged, or after ``flush_timeout`` (1 s) at most.
    A call Redis refused as fenced fails the commit (``UNAVAILABLE``): the client puts the
    block again, at the new leader.
  - ``background``: at once; the writer task sends it on its next turn. **Backpressure**:
    while Redis answers and more than ``max_backlog`` changes (``--redis-backlog``) are not
    yet acknowledged, a commit waits for acknowledgements (or for Redis declared down).

* When Redis is down, the pool keeps serving from memory: commits are answered without
  waiting (every mode), health and metrics say the store is down, and the writer retries.
  Once Redis answers again, the writer rewrites the whole index. Once Redis refused a write
  as fenced by a newer epoch, every commit fails (the lease deposes this master).

**What each failure loses** (a block is lost from Redis; its node still serves it to the
next master only if the node had applied the commit, which it hears of on its next
heartbeat answer, :mod:`kvpool.master.remote`; a lost block is a miss, never wrong bytes):

* ``kill -9`` of the master, its host alive: ``sent`` and ``wait``: nothing answered (the
  kernel delivers what the dead process handed it, and Redis runs all of it, see above).
  ``background``: the commits answered on the event loop's current turn, before the writer
  task's next one (microseconds of commits), and those whose calls wait in the process for a
  full socket buffer (Redis not reading; ``kvpool_metadata_backlog`` shows the lag).
* The master's host crashes, or loses its network for good, at the kill: ``sent``: what was
  in its kernel and not yet received by Redis, about one network round trip of commits.
  ``wait``: nothing answered.
* Redis crashes or restarts empty (no persistence): nothing while the leader lives (it
  rewrites everything). If the leader dies too before that rewrite is acknowledged, the
  next one has what nodes report.
* A fenced call whose commits ``sent`` had answered: another master took the lease between
  the answer and Redis running the call, which needs Redis to sit on a call already in its
  socket for a third of a TTL (1 s) just as the lease lapses. Those blocks are known to no
  master: the node never applied them (it hears of commits only from its leader's heartbeat
  answers, and it follows the new leader, which refuses the old epoch), so the new leader
  does not adopt them from the node's report either. The master logs an error with their
  number (``fenced_after_answer``).
* Under ``wait``, a call not acknowledged within ``flush_timeout`` while Redis is not yet
  declared down (and under ``sent``, a call the kernel did not take within it: Redis stopped
  reading): its commits are answered anyway, and a failover in the next second loses them.

On start, a master loads the namespaces with their settings and the block records
(:meth:`load`), and the tombstones (:meth:`load_tombstones`); a block is served again only
when its node registers with the same incarnation and the node confirms that the slot holds
bytes with the recorded checksum (``NodeControl.VerifyBlocks``), and a block a node reports
is not served when a tombstone names it (:mod:`kvpool.master.tombstones`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import struct
import time
from dataclasses import dataclass

from kvpool.master.redis_pipeline import RedisPipeline
from kvpool.wire import TIER_CODES, TIER_NAMES

__all__ = ["COMMIT_MODES", "BlockRecord", "Fenced", "MetaCollector", "NamespaceSettings", "RedisMeta"]

log = logging.getLogger("kvpool.metastore")

_HEAD = struct.Struct("<BQQQ")  # tier code, offset, size, checksum
_OPS_PER_CALL = 4096
#: What a commit waits for before it is answered (``--redis-commit``), the default first.
COMMIT_MODES = ("sent", "wait", "background")

# KEYS: epoch, then the hashes, then the writer's acknowledgement list. ARGV: epoch, the
# call's sequence number, then (hash number, field, value) triples; an empty value deletes
# the field. The writer's connection gets no replies: the script pushes the sequence number
# (or "F" and the epoch Redis holds) to the list, which the writer's second connection pops.
_WRITE = """
local acks = KEYS[#KEYS]
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  redis.call('RPUSH', acks, 'F' .. tostring(current))
  redis.call('PEXPIRE', acks, 60000)
  return redis.error_reply('FENCED epoch is ' .. tostring(current))
end
local n = 0
for i = 3, #ARGV, 3 do
  local h = KEYS[tonumber(ARGV[i])]
  if ARGV[i + 2] == '' then redis.call('HDEL', h, ARGV[i + 1]) else redis.call('HSET', h, ARGV[i + 1], ARGV[i + 2]) end
  n = n + 1
end
redis.call('RPUSH', acks, ARGV[2])
redis.call('PEXPIRE', acks, 60000)
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
    return _HEAD.pack(TIER_CODES[entry.tier], slot.offset, slot.size, entry.checksum) + _node_tail(node, entry.ns)


def _node_tail(node, ns: str) -> bytes:
    """The end of a block record (:func:`encode_block`): node name, incarnation, namespace."""
    return f"{node.name}\0{node.incarnation}\0{ns}".encode()


def _pack_bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


_HASH_NO = {h: _pack_bulk(str(h).encode()) for h in (_BLOCKS, _NAMESPACES, _NODES, _TENANTS, _REMOVED)}
_BLOCKS_NO = _HASH_NO[_BLOCKS]
_WAITING = object()  # a call's reply before it came


class _Call:
    """One Lua call sent to Redis: its changes (to send again if it fails) and its outcome."""

    __slots__ = ("changes", "early", "n", "other", "reply", "sent_at", "seq", "waiter")

    def __init__(self, changes: list, other: list, n: int, seq: int, sent_at: float) -> None:
        self.changes, self.other, self.n, self.seq, self.sent_at = changes, other, n, seq, sent_at
        #: _WAITING, then True (in Redis), Fenced, or the connection's failure.
        self.reply = _WAITING
        #: A future for commits that wait for the acknowledgement (created only when one does).
        self.waiter: asyncio.Future | None = None
        #: Whether a commit was answered before the acknowledgement (``sent``).
        self.early = False

    def done(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def decode_block(key: bytes, value: bytes) -> BlockRecord:
    tier, offset, size, checksum = _HEAD.unpack_from(value)
    node, incarnation, ns = value[_HEAD.size:].decode().split("\0")
    return BlockRecord(key, TIER_NAMES[tier], offset, size, checksum, node, incarnation, ns)


class RedisMeta:
    def __init__(self, url: str, prefix: str, index, *, flush_timeout: float = 1.0,
                 retry_interval: float = 0.5, max_backlog: int = 65536, commit: str = "sent",
                 socket_timeout: float = 2.0) -> None:
        import redis.asyncio as aioredis

        if commit not in COMMIT_MODES:
            raise ValueError(f"commit {commit!r}: choose one of {', '.join(COMMIT_MODES)}")
        self.url = url
        self.prefix = prefix
        self.index = index
        self.flush_timeout = flush_timeout
        self.retry_interval = retry_interval
        self.max_backlog = max_backlog
        self.commit = commit
        self.socket_timeout = socket_timeout
        #: Commits that waited for the writer (backpressure).
        self.backpressured = 0
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # One immediate retry (a pooled connection that a Redis restart closed), no backoff:
        # redis-py's default (10 retries, exponential backoff) would stall commits and the
        # lease for many seconds while Redis is away; the writer and the lease retry themselves.
        self.redis = aioredis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=1.0,
                                             retry=Retry(NoBackoff(), 1))
        self.keys = [f"{prefix}:epoch", f"{prefix}:blocks", f"{prefix}:namespaces", f"{prefix}:nodes",
                     f"{prefix}:tenants", f"{prefix}:removed"]
        self.epoch = 0
        #: Dirty keys: block key -> index entry (write it) or None (delete it).
        self._dirty: dict[bytes, object] = {}
        self._other: list[tuple[int, bytes | str, bytes]] = []  # namespaces, nodes
        # Changes of calls that failed after they were sent, to send again (under newer ones).
        self._failed: dict[bytes, object] = {}
        self._failed_other: list[tuple[int, bytes | str, bytes]] = []
        self._wake = asyncio.Event()
        #: The write connection (no replies), the acknowledgement connection and its reader.
        self._link: RedisPipeline | None = None
        self._acks: RedisPipeline | None = None
        self._confirmer: asyncio.Task | None = None
        self._acks_key = b""
        self._sha = b""
        self._call_head: bytes = b""
        self._seq = 0
        self._unconfirmed: collections.deque[_Call] = collections.deque()
        self._last_call: _Call | None = None
        #: Changes sent whose acknowledgement has not come yet.
        self._inflight = 0
        self._kicked = False
        self._failed_at = 0.0
        self._progress: asyncio.Future | None = None  # resolved by every reply (backpressure)
        self._task: asyncio.Task | None = None
        self.up = True
        self.down_since: float | None = None
        self.last_error = ""
        self.resyncs = 0
        self.writes = 0
        #: The newer epoch Redis holds once it refused a write as fenced: commits fail from then.
        self.deposed = 0
        #: Commits answered early (``sent``) whose write Redis then refused as fenced.
        self.fenced_after_answer = 0
        self._resync = False
        #: Set when Redis holds a newer epoch (the leader module decides what that means).
        self.on_fenced = None
        #: The master's tombstones (kvpool.master.tombstones), rewritten with the rest after
        #: an outage; None: no node outlives this master (``kvpool serve`` alone).
        self.removals = None
        #: ``sent`` answers early only while this says the lease is comfortably held (set by
        #: the server to ``LeaderLease.fresh``); otherwise a commit waits for Redis's reply.
        self.lease_fresh = lambda: True
        self._tails: dict[tuple[int, str], bytes] = {}

    # ------------------------------------------------------------------ the index's observer

    def stored(self, entries) -> None:
        dirty = self._dirty
        for entry in entries:
            dirty[entry.key] = entry
        self._kick()

    def removed(self, entries) -> None:
        dirty = self._dirty
        for entry in entries:
            dirty[entry.key] = None
        self._kick()

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
        self._kick()

    def _kick(self) -> None:
        """Send the changes on the event loop's next turn, unless a commit sends them first.
        (A callback, not the writer task: waking a task for every commit cost more.)"""
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._kicked_send)

    def _kicked_send(self) -> None:
        self._kicked = False
        link = self._link
        if link is None or self._resync:
            self._wake.set()  # the writer connects, or rewrites everything first
            return
        self._send()
        if not link.handed():
            self._wake.set()  # the writer waits for the kernel to take it

    # ------------------------------------------------------------------ commits

    @property
    def backlog(self) -> int:
        """Changes not yet in Redis: waiting to be sent, or sent and not yet acknowledged."""
        return len(self._dirty) + len(self._other) + len(self._failed) + len(self._failed_other) + self._inflight

    async def admit(self) -> None:
        """What a commit awaits before it is answered (see the module docstring): ``sent``, its
        write handed to the kernel; ``wait``, Redis's acknowledgement of it; ``background``,
        nothing but backpressure. Every mode answers at once while Redis is down (serving from
        memory); ``wait``, and every mode once this master is known to be deposed, raise
        :class:`~kvpool.errors.Unavailable` when Redis refused the write as fenced."""
        if self.deposed:
            self._check(None)
        if self.commit == "background":
            await self._backpressure()
            return
        link = self._link
        if not self.up or link is None:
            return
        self._send()
        call = self._last_call
        if call is None or call.reply is not _WAITING:
            return self._check(call)
        if self.commit == "sent":
            if not link.handed():
                try:
                    await asyncio.wait_for(link.drain(), self.flush_timeout)
                except (ConnectionError, asyncio.TimeoutError):
                    return  # declared down (or about to be): serving from memory
            if self.lease_fresh():
                call.early = True
                return
        # wait (or sent while the lease is not comfortably held): the acknowledgement,
        # flush_timeout at most.
        if call.waiter is None:
            call.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(call.waiter), self.flush_timeout)
        except asyncio.TimeoutError:
            return
        self._check(call)

    async def durable(self) -> None:
        """Wait until Redis acknowledged every change made so far, ``flush_timeout`` at most;
        at once while Redis is down. What a removal (its tombstones) and a namespace's new
        setting await before they are answered, in every ``--redis-commit`` mode: they are
        rare, and the next leader must have them."""
        deadline = time.monotonic() + self.flush_timeout
        while self.up and (self._link is None or self._resync) and self.backlog:
            # (Re)connecting or rewriting everything: the writer sends these changes then.
            if self._progress is None:
                self._progress = asyncio.get_running_loop().create_future()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._progress), left)
        if not self.up or self._link is None or self.deposed:
            return
        self._send()
        call = self._last_call
        if call is None or call.reply is not _WAITING:
            return
        if call.waiter is None:
            call.waiter = asyncio.get_running_loop().create_future()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(call.waiter), max(0.0, deadline - time.monotonic()))

    def _check(self, call: "_Call | None") -> None:
        if self.deposed or (call is not None and isinstance(call.reply, Fenced)):
            from kvpool.errors import Unavailable

            raise Unavailable(f"this master was deposed before Redis took the commit (Redis holds fencing epoch "
                              f"{self.deposed or '?'}); retry the put: the new leader serves it")

    async def _backpressure(self) -> None:
        if self.up and self.backlog > self.max_backlog:
            self.backpressured += 1
        while self.up and self.backlog > self.max_backlog:
            if self._progress is None:
                self._progress = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._progress)  # an acknowledgement, or Redis declared down, resolves it

    # ------------------------------------------------------------------ the writer

    def start(self, epoch: int) -> None:
        self.epoch = epoch
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Write what is left (a master stopped on purpose loses nothing), then close."""
        if self._task is not None:
            self._task.cancel()
            # Not ``await self._task``: asyncio.wait_for of Python 3.11 can swallow a
            # cancellation that lands as its inner future completes, and a stop must not hang.
            await asyncio.wait([self._task], timeout=self.flush_timeout)
            if self.up and self._link is not None and self.backlog:
                self._send()
                call = self._last_call
                if call is not None and call.reply is _WAITING:
                    call.waiter = call.waiter or asyncio.get_running_loop().create_future()
                    try:
                        await asyncio.wait_for(asyncio.shield(call.waiter), self.flush_timeout)
                    except asyncio.TimeoutError:
                        pass
                if self.backlog:
                    log.warning("stopping with %d changes not written to Redis", self.backlog)
        self._close_links()
        await self.redis.aclose()

    async def _run(self) -> None:
        """Connect (again), rewrite everything after an outage, and send what commits did not."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.deposed:
                continue  # another master writes now; this one steps down
            if self._link is None:
                pause = self._failed_at + self.retry_interval - time.monotonic()
                if pause > 0:  # not at once after a failure: Redis may refuse every try
                    await asyncio.sleep(pause)
                try:
                    await self._connect()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # connection refused, timeouts, a Redis that restarted
                    self._went_down(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(self.retry_interval)
                    self._wake.set()
                    continue
            if self._resync:
                await self._rewrite_all()
            link = self._link
            self._send()
            if link is not None and not link.handed():
                try:
                    await link.drain()
                except ConnectionError:
                    pass  # the confirmer saw it too: the changes are back, and it wakes us

    async def _connect(self) -> None:
        """Open the write connection (no replies) and the acknowledgement connection."""
        self._close_links()
        token = secrets.token_hex(6)
        acks = await RedisPipeline.open(self.url, timeout=self.socket_timeout, name=f"{self.prefix}-acks")
        try:
            self._sha = await acks.call("SCRIPT", "LOAD", _WRITE)
            link = await RedisPipeline.open(self.url, timeout=self.socket_timeout, name=f"{self.prefix}-writer",
                                            replies=False)
        except BaseException:
            acks.close()
            raise
        self._acks_key = f"{self.prefix}:acks:{token}".encode()
        keys = [k.encode() for k in self.keys] + [self._acks_key]
        self._call_head = b"".join(_pack_bulk(a) for a in (b"EVALSHA", self._sha, b"%d" % len(keys), *keys))
        self._link, self._acks = link, acks
        self._confirmer = asyncio.create_task(self._confirm(link, acks))

    async def _confirm(self, link: RedisPipeline, acks: RedisPipeline) -> None:
        """Read the acknowledgements the write script pushes (one per call, in order): the
        calls they name are in Redis. No acknowledgement for ``socket_timeout`` while calls
        wait for one (Redis stopped, a script refused) fails the connections."""
        key = self._acks_key
        try:
            while self._link is link:
                reply = await acks.call("BLMPOP", "0.5", "1", key, "LEFT", "COUNT", "4096")
                if reply:
                    for item in reply[1]:
                        self._acknowledged(item)
                elif self._unconfirmed and time.monotonic() - self._unconfirmed[0].sent_at > self.socket_timeout:
                    raise ConnectionError(f"Redis acknowledged no write in {self.socket_timeout:g} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._link is link:
                self._link_failed(f"{type(exc).__name__}: {exc}")

    def _acknowledged(self, item: bytes) -> None:
        unconfirmed = self._unconfirmed
        if item.startswith(b"F"):  # the script found another epoch: nothing of that call was written
            text = f"FENCED epoch is {item[1:].decode()}"
            call = unconfirmed.popleft() if unconfirmed else None
            # A newer epoch: another master leads. No epoch at all is a Redis that restarted
            # empty, which the lease takes back (then everything is written again).
            newer = re.search(r"epoch is (\d+)", text)
            if newer and int(newer.group(1)) > self.epoch:
                self.deposed = int(newer.group(1))
            if call is not None:
                self._inflight -= call.n
                call.reply = Fenced(text)
                self._put_back(call)
                if call.early:
                    self.fenced_after_answer += len(call.changes)
                    log.error("Redis refused a write as fenced after its commits were answered: %d blocks are "
                              "known to no master now (misses, never wrong bytes)", len(call.changes))
                call.done()
            self._link_failed(f"fenced: {text}")
            if self.on_fenced is not None:
                self.on_fenced()
            return
        seq = int(item)
        while unconfirmed and unconfirmed[0].seq <= seq:
            call = unconfirmed.popleft()
            self._inflight -= call.n
            self.writes += call.n
            call.reply = True
            call.done()
        if not self.up:
            log.info("Redis %s answers again; metadata caught up (%d blocks)", self.url, self.index.block_count)
            self.up, self.down_since, self.last_error = True, None, ""
        self._release_progress()

    def _link_failed(self, why: str) -> None:
        """The connections failed (or Redis fenced a write): every call not acknowledged goes
        again (its changes under newer ones), on new connections, after a full rewrite."""
        self._close_links()
        self._failed_at = time.monotonic()
        while self._unconfirmed:
            call = self._unconfirmed.popleft()
            self._inflight -= call.n
            call.reply = ConnectionError(why)
            self._put_back(call)
            call.done()
        self._went_down(why)
        self._wake.set()  # the writer reconnects

    def _put_back(self, call: "_Call") -> None:
        for key, entry in call.changes:
            self._failed[key] = entry
        self._failed_other.extend(call.other)

    def _close_links(self) -> None:
        link, acks, confirmer = self._link, self._acks, self._confirmer
        self._link = self._acks = self._confirmer = None
        for conn in (link, acks):
            if conn is not None:
                conn.close()
        if confirmer is not None and confirmer is not asyncio.current_task():
            confirmer.cancel()

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
        self._release_progress()

    def _release_progress(self) -> None:
        waiter, self._progress = self._progress, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _send(self) -> None:
        """Send every pending change now: Lua calls of at most ``_OPS_PER_CALL`` changes,
        written to the write connection in order, without waiting (the confirmer hears of
        them)."""
        link = self._link
        if link is None:
            return
        if self._failed or self._failed_other:  # what failed goes again, under newer changes
            failed, self._failed = self._failed, {}
            failed.update(self._dirty)
            self._dirty = failed
            self._other[:0] = self._failed_other
            self._failed_other = []
        if not self._dirty and not self._other:
            return
        dirty, self._dirty = self._dirty, {}
        other, self._other = self._other, []
        changes = list(dirty.items())
        nodes, tails = self.index.nodes, self._tails
        epoch = _pack_bulk(b"%d" % self.epoch)
        now = time.monotonic()
        # The records are packed straight into RESP (no list of arguments to build and encode
        # again): hash number, field and value of each change.
        for start in range(0, len(other) + len(changes), _OPS_PER_CALL):
            stop = start + _OPS_PER_CALL
            part_other = other[start:stop]
            part = changes[max(0, start - len(other)):max(0, stop - len(other))]
            self._seq += 1
            body = [epoch, _pack_bulk(b"%d" % self._seq)]
            for h, field, value in part_other:
                body.append(_HASH_NO.get(h) or _pack_bulk(b"%d" % h))
                body.append(_pack_bulk(field.encode() if isinstance(field, str) else field))
                body.append(_pack_bulk(value.encode() if isinstance(value, str) else value))
            for key, entry in part:
                record = b""
                if entry is not None and not entry.doomed:
                    node = nodes.get(entry.node_id)
                    if node is not None:
                        tail = tails.get((entry.node_id, entry.ns))
                        if tail is None:
                            if len(tails) > 4096:  # node ids of past registrations
                                tails.clear()
                            tail = tails[(entry.node_id, entry.ns)] = _node_tail(node, entry.ns)
                        slot = entry.slot
                        record = _HEAD.pack(TIER_CODES[entry.tier], slot.offset, slot.size, entry.checksum) + tail
                body.append(_BLOCKS_NO)
                body.append(b"$%d\r\n%b\r\n" % (len(key), key))
                body.append(b"$%d\r\n%b\r\n" % (len(record), record))
            n = len(part_other) + len(part)
            call = _Call(part, part_other, n, self._seq, now)
            packed = b"*%d\r\n%b%b" % (6 + len(self.keys) + 3 * n, self._call_head, b"".join(body))
            self._inflight += n
            self._last_call = call
            self._unconfirmed.append(call)
            try:
                link.send(packed)
            except ConnectionError as exc:
                self._link_failed(f"{type(exc).__name__}: {exc}")
                return

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
