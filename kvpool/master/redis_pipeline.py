"""A dedicated, pipelined connection to Redis: the metadata writer's (:mod:`kvpool.master.metastore`).

Protocol:

* Opened with ``replies=False``, the connection asks Redis for no replies at all (``CLIENT
  REPLY OFF``), and :meth:`RedisPipeline.send` takes no callback. Why: Redis drops a client
  at the first reply it fails to write, and with it every command of that client it has not
  read yet. A writer that died (kill -9) leaves such commands behind, in Redis's socket; a
  connection Redis never writes to is read to its end instead, so every command the dead
  process had handed to its kernel runs (measured: 100,000 pipelined commands then kill -9:
  all ran without replies, 1,755 to 5,654 with them).
* Otherwise :meth:`RedisPipeline.send` writes one command's RESP bytes (``hiredis.pack_command``) to the
  transport at once, in call order, so Redis runs the commands in that order; it never waits
  for the reply. Redis answers in the same order, and a reader task hands each reply to the
  callback given with its command (oldest first): the reply value, or an exception
  (:class:`ReplyError` for an error reply, ``ConnectionError`` when the connection failed).
* The transport buffers nothing: its high-water mark is 0, so :meth:`handed` is true exactly
  when every byte sent so far is in the kernel's socket buffer, and :meth:`drain` waits until
  it is. Bytes in the kernel are delivered after this process dies (the kernel finishes the
  stream on close); see :mod:`kvpool.master.metastore` for what that promises and what not.
* Any failure (the connection lost or closed by Redis, a reply that does not come within
  ``timeout`` seconds of its command, bytes that are not RESP) closes the connection and fails
  every command still waiting for its reply with ``ConnectionError``. A closed pipeline stays
  closed: open a new one.

It exists beside redis-py's client (which the lease and the loading use) because the write
path needs what that client does not give: a reply checked after the caller moved on, the
kernel hand-off made visible, and a few microseconds of CPU per command rather than hundreds.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable

import hiredis

__all__ = ["RedisPipeline", "ReplyError"]


class ReplyError(Exception):
    """Redis answered a command with an error (``-ERR …``, ``-NOSCRIPT …``, a script's error)."""


class RedisPipeline:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        # The transport keeps no bytes of its own: a write that the kernel did not take at once
        # pauses it, and drain() waits until the kernel has it all.
        writer.transport.set_write_buffer_limits(high=0)
        self._pending: collections.deque[tuple[Callable[[object], None], float]] = collections.deque()
        self._parser = hiredis.Reader(replyError=ReplyError)
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.replies = True
        self.error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url: str, *, timeout: float = 2.0, connect_timeout: float = 1.0,
                   name: str = "kvpool-writer", replies: bool = True) -> RedisPipeline:
        """Connect to ``url`` (``redis://``, ``rediss://`` or ``unix://``, as redis-py reads it),
        authenticate and select the database, and with ``replies=False`` turn replies off;
        raises ``OSError``/``ReplyError`` on failure."""
        from redis.asyncio.connection import SSLConnection, parse_url

        params = parse_url(url)
        if "path" in params:
            opening = asyncio.open_unix_connection(params["path"])
        else:
            tls = ssl.create_default_context() if params.get("connection_class") is SSLConnection else None
            opening = asyncio.open_connection(params.get("host", "localhost"), params.get("port", 6379), ssl=tls)
        reader, writer = await asyncio.wait_for(opening, connect_timeout)
        self = cls(reader, writer, timeout)
        try:
            setup = []
            if params.get("password"):
                setup.append(("AUTH", params["username"], params["password"]) if params.get("username")
                             else ("AUTH", params["password"]))
            if params.get("db"):
                setup.append(("SELECT", params["db"]))
            setup.append(("CLIENT", "SETNAME", name))
            for command in setup:
                await self.call(*command)
            if not replies:
                self.send(hiredis.pack_command(("CLIENT", "REPLY", "OFF")))
                self.replies = False
        except BaseException:
            self.close()
            raise
        return self

    # ------------------------------------------------------------------ sending

    def send(self, packed: bytes, done: Callable[[object], None] | None = None) -> None:
        """Write one packed command now; ``done(reply or exception)`` is called with its reply
        (no ``done`` once replies are off). Raises ``ConnectionError`` on a closed connection."""
        if self.closed:
            raise ConnectionError(f"the Redis connection is closed ({self.error})")
        if done is not None:
            self._pending.append((done, time.monotonic()))
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.timeout, self._watch)
        self._writer.write(packed)

    def handed(self) -> bool:
        """Whether every byte sent so far is in the kernel (nothing left in the transport)."""
        return not self.closed and self._writer.transport.get_write_buffer_size() == 0

    async def drain(self) -> None:
        """Wait until every byte sent so far is in the kernel; ``ConnectionError`` if the
        connection failed first."""
        if self.closed:
            raise ConnectionError(f"the Redis connection is closed ({self.error})")
        await self._writer.drain()

    async def call(self, *args) -> object:
        """Send one command and wait for its reply (setup, script loading: not the hot path)."""
        reply: asyncio.Future = asyncio.get_running_loop().create_future()
        self.send(hiredis.pack_command(args), lambda r: reply.done() or reply.set_result(r))
        result = await asyncio.wait_for(reply, self.timeout)
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def waiting(self) -> int:
        """Commands sent whose reply has not come yet."""
        return len(self._pending)

    # ------------------------------------------------------------------ replies

    async def _read(self) -> None:
        parser, pending = self._parser, self._pending
        try:
            while True:
                data = await self._reader.read(1 << 16)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if not pending:
                        raise ConnectionError(f"Redis sent a reply to no command: {reply!r:.200}")
                    done, _ = pending.popleft()
                    done(reply)
        except asyncio.CancelledError:
            self._fail(ConnectionError("the Redis connection was closed"))
            raise
        except (OSError, hiredis.ProtocolError) as exc:
            self._fail(exc if isinstance(exc, ConnectionError) else ConnectionError(f"{type(exc).__name__}: {exc}"))

    def _watch(self) -> None:
        """Fail the connection when its oldest command has waited ``timeout`` for a reply."""
        self._timer = None
        if self.closed or not self._pending:
            return
        waited = time.monotonic() - self._pending[0][1]
        if waited >= self.timeout:
            self._fail(ConnectionError(f"Redis did not answer in {self.timeout:g} s"))
        else:
            self._timer = asyncio.get_running_loop().call_later(self.timeout - waited, self._watch)

    def _fail(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed, self.error = True, exc
            self._writer.close()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        while self._pending:
            done, _ = self._pending.popleft()
            done(ConnectionError(str(exc)))

    def close(self) -> None:
        """Close now; commands still waiting get ``ConnectionError``."""
        self._fail(ConnectionError("the Redis connection was closed"))
        if not self._task.done():
            self._task.cancel()
