"""kvpool.master.redis_pipeline against a real redis-server: replies in order, error replies,
a Redis that stops answering, and a connection that asks for no replies."""

from __future__ import annotations

import asyncio
import signal

import hiredis
import pytest

from kvpool.master.redis_pipeline import RedisPipeline, ReplyError
from tests.integration.redis_server import redis_server  # noqa: F401  (fixture)


def run(coro):
    return asyncio.run(coro)


def test_replies_come_back_in_order_and_errors_fail_only_their_command(redis_server):
    async def main():
        link = await RedisPipeline.open(redis_server.url, timeout=2.0)
        got = []
        for i in range(200):
            link.send(hiredis.pack_command(("INCR", "n")), got.append)
        link.send(hiredis.pack_command(("HSET", "n", "f", "v")), got.append)  # wrong type: an error reply
        link.send(hiredis.pack_command(("GET", "n")), got.append)
        assert link.handed() or await link.drain() is None
        while len(got) < 202:
            await asyncio.sleep(0.01)
        link.close()
        return got

    got = run(main())
    assert got[:200] == list(range(1, 201))
    assert isinstance(got[200], ReplyError) and "WRONGTYPE" in str(got[200])
    assert got[201] == b"200"


def test_a_redis_that_stops_answering_fails_every_waiting_command(redis_server):
    async def main():
        link = await RedisPipeline.open(redis_server.url, timeout=0.5)
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            got = []
            for _ in range(3):
                link.send(hiredis.pack_command(("PING",)), got.append)
            await asyncio.sleep(1.0)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert link.closed and link.waiting == 0
        with pytest.raises(ConnectionError):
            link.send(hiredis.pack_command(("PING",)))
        return got

    got = run(main())
    assert len(got) == 3 and all(isinstance(r, ConnectionError) and "did not answer in 0.5 s" in str(r) for r in got)


def test_a_connection_without_replies_runs_its_commands_and_reads_nothing(redis_server):
    async def main():
        link = await RedisPipeline.open(redis_server.url, replies=False)
        for _ in range(1000):
            link.send(hiredis.pack_command(("INCR", "quiet")))
        await link.drain()
        r = redis_server.client()
        for _ in range(100):
            if r.get("quiet") == b"1000":
                break
            await asyncio.sleep(0.02)
        assert r.get("quiet") == b"1000"
        assert not link.closed  # no reply arrived (one would close it: a reply to no command)
        link.close()

    run(main())


def test_a_bad_password_is_refused_at_open(redis_server):
    async def main():
        url = redis_server.url.replace("redis://", "redis://:wrong@")
        with pytest.raises(ReplyError, match="AUTH"):
            await RedisPipeline.open(url)

    run(main())
