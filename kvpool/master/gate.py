"""Only the leader serves: a gRPC interceptor in front of a master's services.

A master that does not lead (a standby, or a deposed leader) answers every pool, admin and
registry call with UNAVAILABLE; so does a leader that just took over, to clients, while its
nodes register again (a few heartbeats), rather than telling them the pool is empty. The
answer names the leader's address in the message and in the trailing
metadata key ``kvpool-leader`` (empty while none is known). Clients and nodes given several
master addresses (``--master a:p,b:p``) go there (:mod:`kvpool.masters`). Health checks
and reflection are always answered, so a process supervisor sees a standby as alive.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import grpc

from kvpool.masters import LEADER_METADATA

__all__ = ["LeaderGate"]
_ALWAYS = ("/grpc.health.", "/grpc.reflection.")


class LeaderGate(grpc.aio.ServerInterceptor):
    """``admits(method)`` (awaitable) says whether the master serves a method now, by its
    full name (``/package.Service/Method``); ``leader()`` is the address to name, and
    ``why()`` the reason a person reads."""

    def __init__(self, admits: Callable[[str], Awaitable[bool]], leader: Callable[[], str],
                 why: Callable[[], str]) -> None:
        self.admits = admits
        self.leader = leader
        self.why = why

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_ALWAYS) or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = details.method

        async def gated(request, context):
            if await self.admits(method):
                return await inner(request, context)
            context.set_trailing_metadata(((LEADER_METADATA, self.leader()),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this master does not serve now: {self.why()}")

        return grpc.unary_unary_rpc_method_handler(gated, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
