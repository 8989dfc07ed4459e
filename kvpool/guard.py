"""Malformed requests get INVALID_ARGUMENT, and a flood of them cannot fill the disk.

gRPC itself answers a request body that does not parse as the method's message with
UNKNOWN and logs a full traceback for each one. :class:`RequestGuard`, a server
interceptor, swaps each handler's deserializer for one that never raises: a body that does
not parse reaches the handler as :class:`Malformed`, and the guard answers it with
INVALID_ARGUMENT naming the message type, before any servicer code runs.

:class:`LogLimiter` keeps logs bounded: at most one line per method per interval, carrying
how many events it stands for. Servicers use it for internal errors as well.

The guard is the first code of the server to see a call, so it also notes when the call
arrived (:func:`arrival_time`): the master's latency histogram counts from there, so that
time a call waits on a busy event loop is part of the latency it reports.

Oversized messages never reach this module: the server's ``grpc.max_receive_message_length``
(``--max-message-bytes``) makes gRPC refuse them with RESOURCE_EXHAUSTED from the length
prefix, before the body is read in full.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
from typing import Callable

import grpc

__all__ = ["RequestGuard", "LogLimiter", "Malformed", "arrival_time"]

# Each call runs in its own task, which copies the server's context: a value set while the
# guard intercepts the call is seen by that call's handler alone.
_arrived: contextvars.ContextVar[float | None] = contextvars.ContextVar("kvpool_arrived", default=None)


def arrival_time() -> float | None:
    """``time.perf_counter()`` when the call being handled reached the guard; None outside one."""
    return _arrived.get()


class Malformed:
    """A request body that did not parse (what the guarded deserializer returns instead)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class LogLimiter:
    """Log at most one line per key (an RPC method) per ``interval`` seconds, with a count.

    The first event of an interval is logged at once; the ones after it are counted and
    reported with the next event logged for that key.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._state: dict[str, tuple[float, int]] = {}  # key -> (when last logged, events since)
        self._lock = threading.Lock()

    def event(self, key: str, message: str, *, level: int = logging.WARNING, exc_info=None) -> bool:
        """Record one event; returns whether a line was written for it."""
        now = self.clock()
        with self._lock:
            last, suppressed = self._state.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._state[key] = (last, suppressed + 1)
                return False
            self._state[key] = (now, 0)
        more = f" (and {suppressed} more like it in the last {self.interval:g}s)" if suppressed else ""
        self.logger.log(level, "%s: %s%s", key, message, more, exc_info=exc_info)
        return True


def _safe(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, and anything else a parser may raise
            return Malformed(exc)

    return parse


class RequestGuard(grpc.aio.ServerInterceptor):
    """Answers requests whose body does not parse with INVALID_ARGUMENT (see module docstring)."""

    def __init__(self, limiter: LogLimiter) -> None:
        self.limiter = limiter

    def _refuse(self, method: str, bad: Malformed) -> str:
        self.limiter.event(method, f"malformed request refused ({type(bad.error).__name__}: {bad.error})")
        return (f"{method}: the request does not parse as this method's message ({bad.error}); "
                f"send a serialized protobuf of the method's request type")

    async def intercept_service(self, continuation, details):
        _arrived.set(time.perf_counter())
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method
        refuse = self._refuse
        parse = _safe(handler.request_deserializer)
        kw = dict(request_deserializer=parse, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                if type(request) is Malformed:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refuse(method, request))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request, context):
                if type(request) is Malformed:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refuse(method, request))
                result = inner_us(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write() (grpc_health's Watch)
                    await result

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

        async def checked(requests, context):
            async for request in requests:
                if type(request) is Malformed:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refuse(method, request))
                yield request

        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests, context):
                async for item in inner_ss(checked(requests, context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
        inner_su = handler.stream_unary

        async def stream_unary(requests, context):
            return await inner_su(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
