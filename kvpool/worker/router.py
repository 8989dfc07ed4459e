"""Router: sends each request to a prefill worker, then with its first token to a decode
worker (or, colocated, to one worker that does both), and reports what happened.

A request's ``ttft_s`` is the time from :meth:`Router.submit` until its first token is
back at the router; ``latency_s`` until its last. With several workers of a role, each
request goes to the one with the fewest requests in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from kvpool.errors import KvpoolError
from kvpool.worker.protocol import MAX_LINE, receive, send

__all__ = ["Router", "Result", "WorkerError"]


class WorkerError(KvpoolError):
    """A worker answered a request with an error event."""


@dataclass
class Result:
    id: int
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    first_token: int | None = None
    ttft_s: float = 0.0
    latency_s: float = 0.0
    prefill: dict = field(default_factory=dict)
    decode: dict = field(default_factory=dict)


class _Conn:
    def __init__(self, address: str, on_event) -> None:
        self.address = address
        self.on_event = on_event
        self.in_flight = 0
        self.stats_reply = None
        self.reader = self.writer = None
        self.task = None

    async def open(self) -> None:
        host, port = self.address.rsplit(":", 1)
        self.reader, self.writer = await asyncio.open_connection(host, int(port), limit=MAX_LINE)
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        while (msg := await receive(self.reader)) is not None:
            self.on_event(self, msg)
        self.on_event(self, {"event": "closed"})

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()


class Router:
    """``Router(prefill=[addr], decode=[addr])`` or ``Router(colocated=[addr])``."""

    def __init__(self, prefill=(), decode=(), colocated=()) -> None:
        if colocated and (prefill or decode):
            raise ValueError("a router is either colocated or disaggregated (prefill + decode), not both")
        if not colocated and not (prefill and decode):
            raise ValueError("a disaggregated router needs at least one prefill and one decode worker")
        self.prefill = [_Conn(a, self._on_event) for a in prefill]
        self.decode = [_Conn(a, self._on_event) for a in decode]
        self.colocated = [_Conn(a, self._on_event) for a in colocated]
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Result, float, asyncio.Future, dict]] = {}

    async def __aenter__(self) -> "Router":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        for c in (*self.prefill, *self.decode, *self.colocated):
            await c.open()

    async def close(self) -> None:
        for c in (*self.prefill, *self.decode, *self.colocated):
            await c.close()

    @staticmethod
    def _pick(conns: list[_Conn]) -> _Conn:
        conn = min(conns, key=lambda c: c.in_flight)
        conn.in_flight += 1
        return conn

    async def submit(self, tokens: list[int], max_tokens: int) -> Result:
        """Run one request to the end; raises WorkerError if a worker refused it."""
        rid = next(self._ids)
        result = Result(rid, len(tokens))
        fut = asyncio.get_running_loop().create_future()
        msg = {"id": rid, "tokens": list(tokens), "max_tokens": int(max_tokens)}
        self._pending[rid] = (result, time.perf_counter(), fut, msg)
        if self.colocated:
            await send(self._pick(self.colocated).writer, {"op": "generate", **msg})
        else:
            await send(self._pick(self.prefill).writer, {"op": "prefill", **msg})
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def stats(self) -> dict[str, dict]:
        """Each worker's counters (requests, batches, largest batch, transports in use)."""
        out = {}
        for conn in (*self.prefill, *self.decode, *self.colocated):
            conn.stats_reply = asyncio.get_running_loop().create_future()
            await send(conn.writer, {"op": "stats"})
            out[conn.address] = await conn.stats_reply
        return out

    def _on_event(self, conn: _Conn, msg: dict) -> None:
        event = msg.get("event")
        if event == "stats":
            if conn.stats_reply is not None and not conn.stats_reply.done():
                conn.stats_reply.set_result({k: v for k, v in msg.items() if k != "event"})
            return
        if event == "closed":
            for result, _, fut, _ in list(self._pending.values()):
                if not fut.done():
                    fut.set_exception(WorkerError(f"worker {conn.address} closed the connection"))
            return
        entry = self._pending.get(msg.get("id"))
        if entry is None:
            return
        result, t0, fut, request = entry
        now = time.perf_counter()
        stats = {k: v for k, v in msg.items() if k not in ("event", "id", "token", "tokens")}
        if event == "error":
            conn.in_flight -= 1
            if not fut.done():
                fut.set_exception(WorkerError(f"worker {conn.address}: {msg.get('message')}"))
        elif event == "first":
            result.first_token = msg["token"]
            result.ttft_s = now - t0
            result.prefill = stats
            if conn in self.prefill:
                conn.in_flight -= 1
                nxt = self._pick(self.decode)
                asyncio.ensure_future(send(nxt.writer, {"op": "decode", "first_token": msg["token"], **request}))
        elif event == "done":
            conn.in_flight -= 1
            result.tokens = msg["tokens"]
            result.latency_s = now - t0
            result.decode = stats
            if not fut.done():
                fut.set_result(result)
