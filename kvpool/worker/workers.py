"""PrefillWorker, DecodeWorker and ColocatedWorker: an Engine behind a batching loop.

Each worker takes requests from any number of router connections into one queue. Its
loop takes everything queued at once as a batch: one batched prefill of all new prompts
(and, for decode, one step of every running sequence), so requests that arrive together
are computed together.

* **PrefillWorker**: per request, fetch the longest cached prefix from the pool (whole
  blocks, never the block holding the last prompt token), compute the rest, publish the
  full blocks it computed, and answer ``first`` with the first output token. With
  ``reuse=False`` it skips the fetch (the "no reuse" setup) but still publishes, since the
  decode worker reads the prompt from the pool.
* **DecodeWorker**: per request, fetch every full block of the prompt from the pool,
  recompute the last partial block (fewer than ``block_tokens`` tokens: the one part of a
  prompt the pool never keys), check that it gives the first token the prefill worker
  sent, and generate greedily up to ``max_tokens``; answer ``done``.
* **ColocatedWorker**: prefill and decode in one engine with no pool (the baseline).

The workers publish and fetch through :class:`kvpool.AsyncClient`, one per worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from kvpool.errors import KvpoolError
from kvpool.worker.engine import Engine, Sequence
from kvpool.worker.protocol import receive, send

__all__ = ["Worker", "PrefillWorker", "DecodeWorker", "ColocatedWorker", "WORKERS"]

log = logging.getLogger("kvpool.worker")


class Request:
    __slots__ = ("msg", "seq", "stats", "t0", "writer")

    def __init__(self, msg: dict, writer) -> None:
        self.msg = msg
        self.writer = writer
        self.seq: Sequence | None = None
        self.stats = {"hit_tokens": 0, "computed_tokens": 0, "fetched_bytes": 0, "published_blocks": 0,
                      "compute_ms": 0.0}
        self.t0 = time.perf_counter()


class Worker:
    """The serving loop shared by every role. Subclasses implement :meth:`step`."""

    role = "worker"
    op = ""

    def __init__(self, engine: Engine, client=None) -> None:
        self.engine = engine
        self.client = client
        self.queue: asyncio.Queue[Request] = asyncio.Queue()
        # One compute thread: the engine is single-threaded; the loop stays free for I/O.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kvpool-{self.role}")
        self.totals = {"requests": 0, "batches": 0, "max_batch": 0}
        self._seq_ids = itertools.count()

    async def warm_up(self) -> None:
        """Run the model once and open the data plane to the pool before serving, so the
        first request does not pay for torch's first calls or the first mapping of the
        node's arena (a second or more)."""
        c = self.engine.block_tokens
        await self.compute(self._warm_engine, c)
        if self.client is not None:
            from dataclasses import replace

            ns = replace(self.engine.namespace, salt="kvpool-worker-warm-up")
            # On the cache's device, so a GPU worker pins the node's arena now, not on a request.
            block = self.engine.cache.staging(1).zero_()
            keys = ns.keys([os.getpid()] * c)  # a block of this process alone, removed after
            await self.client.put_blocks(keys, block, namespace=ns)
            await self.client.get_blocks(keys, block, namespace=ns)
            await self.client.remove(keys)

    def _warm_engine(self, c: int) -> None:
        e = self.engine
        seq = e.add("warm-up", [0] * (c + 1), reserve=1)
        try:
            e.prefill([seq])  # prefill and decode kernels (Triton compiles them here)
            e.decode([seq])
            e.load(seq, e.export(seq, 0, 1))  # the copy kernels, on bits already there
        finally:
            e.free(seq)

    async def compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (msg := await receive(reader)) is not None:
                if msg.get("op") == "stats":
                    kinds = self.client.transports.open_kinds() if self.client is not None else {}
                    await send(writer, {"event": "stats", "role": self.role, **self.totals,
                                        "transports": sorted(set(kinds.values()))})
                elif msg.get("op") != self.op:
                    await send(writer, {"event": "error", "id": msg.get("id"),
                                        "message": f"a {self.role} worker takes op {self.op!r}, not {msg.get('op')!r}"})
                else:
                    self.queue.put_nowait(Request(msg, writer))
        except (ConnectionError, ValueError) as exc:  # a bad line or a router gone: drop the connection
            log.warning("router connection closed: %s", exc)
        finally:
            writer.close()

    async def run(self) -> None:
        """Forever: take every queued request as one batch and step it."""
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            await self.step(batch)

    async def step(self, batch: list[Request]) -> None:
        raise NotImplementedError

    def _admit(self, batch: list[Request], reserve) -> list[Request]:
        """Sequences for valid requests; the others get an error event now."""
        ok = []
        for r in batch:
            try:
                tokens = r.msg["tokens"]
                if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                    raise ValueError("tokens must be a list of integer token ids")
                max_tokens = int(r.msg.get("max_tokens", 1))
                if max_tokens < 1:
                    raise ValueError("max_tokens must be at least 1")
                # The worker's own sequence number: ids are only unique per router connection.
                r.seq = self.engine.add(next(self._seq_ids), tokens, reserve=reserve(max_tokens))
                ok.append(r)
            except Exception as exc:  # noqa: BLE001 - a malformed request, or CacheFull: this one fails, not the worker
                asyncio.ensure_future(self._fail(r, exc))
        self.totals["requests"] += len(batch)
        self.totals["batches"] += 1
        self.totals["max_batch"] = max(self.totals["max_batch"], len(batch))
        return ok

    async def _fail(self, r: Request, exc: BaseException) -> None:
        if r.seq is not None:
            self.engine.free(r.seq)
            r.seq = None
        try:
            await send(r.writer, {"event": "error", "id": r.msg.get("id"), "message": f"{type(exc).__name__}: {exc}"})
        except ConnectionError:
            pass

    async def _fetch_prefix(self, r: Request, blocks: int) -> None:
        """Fetch up to ``blocks`` leading pool blocks of the prompt into the cache."""
        seq = r.seq
        if blocks <= 0:
            return
        c = self.engine.block_tokens
        staging = self.engine.cache.staging(blocks)
        hit = await self.client.fetch(seq.tokens[: blocks * c], staging)
        if hit:
            await self.compute(self.engine.load, seq, staging[:hit])
        r.stats["hit_tokens"] = hit * c
        r.stats["fetched_bytes"] = hit * self.engine.cache.pool_layout.block_bytes

    async def _prefill_or_fail(self, live: list[Request]) -> list[int] | None:
        """Prefill the batch; on an error every request in it is failed (reported to the
        router) and None is returned, so the worker serves on."""
        try:
            return await self._prefill(live)
        except Exception as exc:  # noqa: BLE001 - reported to the router; the worker serves on
            for r in live:
                await self._fail(r, exc)
            return None

    async def _prefill(self, live: list[Request]) -> list[int]:
        for r in live:
            r.stats["computed_tokens"] = len(r.seq.tokens) - r.seq.cached
        t = time.perf_counter()
        firsts = await self.compute(self.engine.prefill, [r.seq for r in live])
        ms = (time.perf_counter() - t) * 1e3
        for r in live:
            r.stats["compute_ms"] += ms
        return firsts


class PrefillWorker(Worker):
    role = "prefill"
    op = "prefill"

    def __init__(self, engine: Engine, client, reuse: bool = True) -> None:
        super().__init__(engine, client)
        self.reuse = reuse

    async def step(self, batch: list[Request]) -> None:
        live = self._admit(batch, reserve=lambda _: 0)
        ns = self.engine.namespace
        for r in list(live):
            try:
                if self.reuse:
                    await self._fetch_prefix(r, self.engine.usable_hit(r.seq, self.engine.full_blocks(r.seq)))
            except Exception as exc:  # noqa: BLE001 - the pool failed this request: say so, keep serving
                live.remove(r)
                await self._fail(r, exc)
        if not live:
            return
        firsts = await self._prefill_or_fail(live)
        if firsts is None:
            return
        for r, first in zip(live, firsts):
            seq = r.seq
            done = r.stats["hit_tokens"] // self.engine.block_tokens
            full = self.engine.full_blocks(seq)
            try:
                if full > done:
                    blocks = await self.compute(self.engine.export, seq, done, full)
                    keys = ns.keys(seq.tokens[: seq.prompt_len])
                    res = await self.client.put_blocks(keys[done:full], blocks, first_position=done)
                    r.stats["published_blocks"] = res.written
            except KvpoolError as exc:
                # The request still goes on: the decode worker computes what it cannot fetch,
                # with the same result (only slower). Say so in the stats.
                log.warning("publishing request %s failed: %s", r.msg["id"], exc)
                r.stats["publish_error"] = f"{type(exc).__name__}: {exc}"
            self.engine.free(seq)
            r.seq = None
            try:
                await send(r.writer, {"event": "first", "id": r.msg["id"], "token": first, **r.stats})
            except ConnectionError:
                pass


class DecodeWorker(Worker):
    role = "decode"
    op = "decode"

    def __init__(self, engine: Engine, client) -> None:
        super().__init__(engine, client)
        self.running: list[Request] = []

    async def run(self) -> None:
        while True:
            if not self.running:
                batch = [await self.queue.get()]
            else:
                batch = []
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            await self.step(batch)

    async def step(self, batch: list[Request]) -> None:
        if batch:
            await self._start(batch)
        if not self.running:
            return
        t = time.perf_counter()
        try:
            await self.compute(self.engine.decode, [r.seq for r in self.running if not self._finished(r)])
        except Exception as exc:  # noqa: BLE001 - reported to the router; the worker serves on
            for r in self.running:
                await self._fail(r, exc)
            self.running = []
            return
        ms = (time.perf_counter() - t) * 1e3
        still = []
        for r in self.running:
            r.stats["compute_ms"] += ms
            if self._finished(r):
                await self._finish(r)
            else:
                still.append(r)
        self.running = still

    @staticmethod
    def _finished(r: Request) -> bool:
        return len(r.seq.generated) >= int(r.msg["max_tokens"])

    async def _finish(self, r: Request) -> None:
        seq = r.seq
        try:
            await send(r.writer, {"event": "done", "id": r.msg["id"], "tokens": seq.generated, **r.stats})
        except ConnectionError:
            pass
        self.engine.free(seq)

    async def _start(self, batch: list[Request]) -> None:
        live = self._admit(batch, reserve=lambda n: n)
        for r in list(live):
            try:
                first = int(r.msg["first_token"])
                await self._fetch_prefix(r, self.engine.full_blocks(r.seq))
            except Exception as exc:  # noqa: BLE001 - reported to the router; the worker serves on
                live.remove(r)
                await self._fail(r, exc)
                continue
            r.msg["first_token"] = first
        tail = [r for r in live if r.seq.cached < len(r.seq.tokens)]
        if tail:
            try:
                got = await self._prefill(tail)
            except Exception as exc:  # noqa: BLE001 - reported to the router; the worker serves on
                for r in tail:
                    live.remove(r)
                    await self._fail(r, exc)
                got = []
            for r, token in zip(tail, got):
                if token != r.msg["first_token"]:
                    # Both sides ran the same chunk on the same bits; a difference means
                    # the pool handed this worker other KV than the prefill computed.
                    live.remove(r)
                    await self._fail(r, RuntimeError(
                        f"decode recomputed first token {token} but prefill sent {r.msg['first_token']}: "
                        f"the KV in the pool is not what the prefill worker computed"))
        for r in live:
            if r.seq.cached == len(r.seq.tokens):  # block-aligned prompt: nothing to recompute
                r.seq.tokens.append(r.msg["first_token"])
                r.seq.generated.append(r.msg["first_token"])
            if self._finished(r):
                await self._finish(r)
            else:
                self.running.append(r)


class ColocatedWorker(DecodeWorker):
    """Prefill and decode in one engine, no pool: the baseline the others are compared with."""

    role = "colocated"
    op = "generate"

    def __init__(self, engine: Engine, client=None) -> None:
        super().__init__(engine, None)

    async def _start(self, batch: list[Request]) -> None:
        live = self._admit(batch, reserve=lambda n: n)
        if not live:
            return
        firsts = await self._prefill_or_fail(live)
        if firsts is None:
            return
        for r, first in zip(live, firsts):
            await send(r.writer, {"event": "first", "id": r.msg["id"], "token": first, **r.stats})
            # "done" reports decoding only; the prefill's counts went with "first".
            r.stats = {**r.stats, "computed_tokens": 0, "compute_ms": 0.0}
            if self._finished(r):
                await self._finish(r)
            else:
                self.running.append(r)


WORKERS = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}
