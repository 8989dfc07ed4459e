"""What every gRPC handler of the master does around its body (:func:`rpc`).

It turns :mod:`kvpool.errors` exceptions into gRPC statuses with their messages (the server
keeps serving), reports a bug as INTERNAL naming the exception, and records the call's
latency and status code in ``kvpool_rpc_duration_seconds``, counted from the call's arrival at
the server's first interceptor (:func:`kvpool.guard.arrival_time`; waiting for a busy event
loop included) to the handler's answer. The client-facing services
(:mod:`kvpool.master.servicer`) and the node registry (:mod:`kvpool.master.remote`) share it,
so neither depends on the other.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time

import grpc

from kvpool.errors import InternalError, KvpoolError
from kvpool.guard import LogLimiter, arrival_time

__all__ = ["rpc"]

log = logging.getLogger("kvpool.master")
#: A request that trips a bug may come in a flood: one traceback per method per interval.
_bugs = LogLimiter(log, interval=10.0)


def rpc(method):
    """Map kvpool errors to statuses and time the call (``kvpool_rpc_duration_seconds``)."""

    name = method.__name__

    @functools.wraps(method)
    async def handler(self, request, context):
        start = arrival_time() or time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            result = method(self, request, context)
            if inspect.isawaitable(result):  # handlers that wait on tier movement
                result = await result
            return result
        except KvpoolError as exc:
            code = exc.code
            await context.abort(code, str(exc))
        except ValueError as exc:  # validation in constructors (KVLayout, Namespace)
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, f"{name}: {exc}")
        except Exception as exc:  # a bug: report it, keep serving
            _bugs.event(name, "failed", level=logging.ERROR, exc_info=True)
            code = InternalError.code
            await context.abort(code, f"{name}: internal error ({type(exc).__name__}: {exc}); please report it")
        finally:
            self.metrics.observe_rpc(name, code.name, time.perf_counter() - start)

    return handler
