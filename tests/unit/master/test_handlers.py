"""kvpool.master.handlers.rpc times a call from its arrival at the server (kvpool.guard), over
a real gRPC server on loopback: time spent before the handler runs counts as latency."""

from __future__ import annotations

import asyncio

import grpc

from kvpool.guard import LogLimiter, RequestGuard
from kvpool.master.handlers import rpc
from kvpool.metrics import Metrics
from kvpool.rpc.v1 import common_pb2

DELAY = 0.2


class _Slow(grpc.aio.ServerInterceptor):
    """Stands for a busy server between a call's arrival and its handler."""

    async def intercept_service(self, continuation, details):
        await asyncio.sleep(DELAY)
        return await continuation(details)


class _Service:
    def __init__(self) -> None:
        self.metrics = Metrics(None)

    @rpc
    def Echo(self, request, context):
        return request


def _seconds(metrics: Metrics, method: str) -> tuple[float, float]:
    for family in metrics.registry.collect():
        if family.name == "kvpool_rpc_duration_seconds":
            got = {s.name: s.value for s in family.samples if s.labels.get("method") == method}
            return got["kvpool_rpc_duration_seconds_count"], got["kvpool_rpc_duration_seconds_sum"]
    raise AssertionError("no kvpool_rpc_duration_seconds")


async def _run() -> tuple[float, float]:
    import logging

    svc = _Service()
    server = grpc.aio.server(interceptors=[RequestGuard(LogLimiter(logging.getLogger("test"))), _Slow()])
    handler = grpc.unary_unary_rpc_method_handler(
        svc.Echo.__get__(svc), request_deserializer=common_pb2.StatsRequest.FromString,
        response_serializer=common_pb2.StatsRequest.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary("/t.T/Echo", request_serializer=common_pb2.StatsRequest.SerializeToString,
                                  response_deserializer=common_pb2.StatsRequest.FromString)
            for _ in range(3):
                await echo(common_pb2.StatsRequest(), timeout=10)
    finally:
        await server.stop(None)
    return _seconds(svc.metrics, "Echo")


def test_latency_counts_from_the_calls_arrival_not_from_the_handler():
    count, total = asyncio.run(_run())
    assert count == 3
    assert total >= 3 * DELAY * 0.9  # the wait before the handler is in it
    assert total < 3 * DELAY + 5
