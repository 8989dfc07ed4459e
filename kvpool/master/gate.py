"""Only the leader serves: a gRPC interceptor in front of a master's services.

A master that does not lead (a standby, or a deposed leader) answers every pool, admin and
registry call with UNAVAILABLE, the leader's address in the message and in the trailing
metadata key ``kvpool-leader`` (empty while none is known). Clients and nodes given several
master addresses (``--master a:p,b:p``) go there (:mod:`kvpool.masters`). Health checks
and reflection are always answered, so a process supervisor sees a standby as alive.
"""

from __future__ import annotations

from typing import Callable

import grpc

from kvpool.masters import LEADER_METADATA

__all__ = ["LeaderGate"]
_ALWAYS = ("/grpc.health.", "/grpc.reflection.")


class LeaderGate(grpc.aio.ServerInterceptor):
    def __init__(self, leads: Callable[[], bool], leader: Callable[[], str]) -> None:
        self.leads = leads
        self.leader = leader

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_ALWAYS) or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def gated(request, context):
            if self.leads():
                return await inner(request, context)
            leader = self.leader()
            context.set_trailing_metadata(((LEADER_METADATA, leader),))
            where = f"the leader is at {leader}" if leader else "no leader is elected yet; retry shortly"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this master does not lead ({where})")

        return grpc.unary_unary_rpc_method_handler(gated, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
