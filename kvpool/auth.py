"""Bearer-token authentication and role checks for every gRPC service (docs/design.md §3c).

Protocol: a caller sends ``authorization: Bearer <token>`` in the gRPC metadata of each
call (what grpcurl's ``-H`` and most gRPC clients send). A server started with a token
table (``--auth-tokens FILE``) runs :class:`AuthInterceptor`, which decides before the
handler runs:

* no token, or one not in the table -> UNAUTHENTICATED;
* a token whose role may not call the method (:data:`METHOD_ROLES`) -> PERMISSION_DENIED;
* otherwise the handler runs, and :func:`current_caller` tells it who called (tenant, role),
  so that a ``client`` token only ever sees its own tenant's namespaces and blocks.

A server without a table authenticates nobody (:func:`current_caller` is None): that is the
embedded default on loopback. A table file holds one token per line::

    # token                            role    tenant
    3f9c...e1 (at least 16 characters)   client  alice
    77aa...02                            admin
    c0de...99                            node

Roles: ``client`` (the pool service for one tenant, and listing that tenant's blocks),
``admin`` (everything an operator does, any tenant), ``node`` (node <-> master traffic).
"""

from __future__ import annotations

import contextvars
import inspect
import ipaddress
import os
from dataclasses import dataclass
from typing import Mapping

import grpc

from kvpool.identity import MAX_TENANT_BYTES

__all__ = ["Caller", "TokenTable", "AuthInterceptor", "current_caller", "bearer_metadata", "resolve_token",
           "is_loopback", "CLIENT", "ADMIN", "NODE", "METHOD_ROLES", "MIN_TOKEN_CHARS"]

CLIENT, ADMIN, NODE = "client", "admin", "node"
ROLES = (CLIENT, ADMIN, NODE)
#: Shorter tokens are refused when the table is read: a token is a password.
MIN_TOKEN_CHARS = 16
#: Anyone, token or not (load balancers and Kubernetes probe health without one).
PUBLIC = frozenset({"*"})
#: Any valid token.
ANY_ROLE = frozenset(ROLES)

#: Who may call what: a full method name, or a service prefix ending in "/". The longest
#: match wins; a method that matches nothing needs a valid token and then gets whatever
#: gRPC answers (UNIMPLEMENTED for a method that does not exist).
METHOD_ROLES: Mapping[str, frozenset[str]] = {
    "/kvpool.v1.KVPool/": frozenset({CLIENT, ADMIN}),
    "/kvpool.v1.Admin/": frozenset({ADMIN}),
    # A client lists and inspects its own tenant's blocks (the servicer narrows the view).
    "/kvpool.v1.Admin/ListBlocks": frozenset({CLIENT, ADMIN}),
    "/kvpool.v1.Admin/Inspect": frozenset({CLIENT, ADMIN}),
    # A client receives its own tenant's KV events; an admin every tenant's.
    "/kvpool.v1.Admin/SubscribeEvents": frozenset({CLIENT, ADMIN}),
    "/kvpool.v1.Registry/": frozenset({NODE}),
    "/kvpool.v1.NodeControl/": frozenset({NODE}),
    "/grpc.health.v1.Health/": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/": ANY_ROLE,
    "/grpc.reflection.v1.ServerReflection/": ANY_ROLE,
}


@dataclass(frozen=True)
class Caller:
    """Who made a call: its role, its tenant (client tokens), and the token itself (the
    master calls a node back with the token the node registered with)."""

    role: str
    tenant: str = ""
    token: str = ""

    @property
    def is_client(self) -> bool:
        return self.role == CLIENT


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("kvpool_caller", default=None)


def current_caller() -> Caller | None:
    """The authenticated caller of the RPC being handled; None on a server without tokens."""
    return _caller.get()


class TokenTable:
    """token -> :class:`Caller`, read from a file (see the module docstring)."""

    def __init__(self, callers: Mapping[str, Caller]) -> None:
        self._callers = dict(callers)

    @classmethod
    def load(cls, path: str) -> "TokenTable":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"auth_tokens: cannot read {path}: {exc.strerror}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, where: str = "tokens") -> "TokenTable":
        callers: dict[str, Caller] = {}
        for n, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            at = f"{where}:{n}"
            if len(fields) not in (2, 3):
                raise ValueError(f"{at}: expected 'TOKEN ROLE [TENANT]', got {len(fields)} fields")
            token, role = fields[0], fields[1]
            tenant = fields[2] if len(fields) == 3 else ""
            if role not in ROLES:
                raise ValueError(f"{at}: unknown role {role!r}; roles are {', '.join(ROLES)}")
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"{at}: token is {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                                 f"random ones (e.g. `python -c 'import secrets; print(secrets.token_hex(24))'`)")
            if role == CLIENT and not tenant:
                raise ValueError(f"{at}: a client token names its tenant: 'TOKEN client TENANT'")
            if role != CLIENT and tenant:
                raise ValueError(f"{at}: only client tokens have a tenant ({role} tokens act for all)")
            if len(tenant.encode()) > MAX_TENANT_BYTES:
                raise ValueError(f"{at}: tenant names are at most {MAX_TENANT_BYTES} bytes")
            if token in callers:
                raise ValueError(f"{at}: this token is listed twice")
            callers[token] = Caller(role, tenant, token)
        if not callers:
            raise ValueError(f"{where}: no tokens in the file; every call would be refused")
        return cls(callers)

    def get(self, token: str) -> Caller | None:
        return self._callers.get(token)

    def first(self, role: str) -> Caller | None:
        return next((c for c in self._callers.values() if c.role == role), None)

    def __len__(self) -> int:
        return len(self._callers)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _token_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _roles_for(method: str, table: Mapping[str, frozenset[str]]) -> frozenset[str]:
    best, roles = -1, ANY_ROLE
    for prefix, allowed in table.items():
        if (method == prefix or (prefix.endswith("/") and method.startswith(prefix))) and len(prefix) > best:
            best, roles = len(prefix), allowed
    return roles


def _denied(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as ``handler`` that fails with ``code``."""

    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    kw = {}
    if handler is not None:
        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.stream_unary_rpc_method_handler(unary, **kw)


def _as(caller: Caller, handler):
    """``handler`` with :func:`current_caller` set to ``caller`` while it runs."""
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:  # KV events: the stream is narrowed to the caller's tenant
        inner_stream = handler.unary_stream

        async def streaming(request, context):
            reset = _caller.set(caller)
            try:
                result = inner_stream(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write()
                    await result
            finally:
                _caller.reset(reset)

        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return handler  # health and reflection: they do not ask who called
    inner = handler.unary_unary

    async def behavior(request, context):
        reset = _caller.set(caller)
        try:
            return await inner(request, context)
        finally:
            _caller.reset(reset)

    return grpc.unary_unary_rpc_method_handler(behavior, **kw)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's bearer token against ``table`` and its role against :data:`METHOD_ROLES`."""

    def __init__(self, table: TokenTable, roles: Mapping[str, frozenset[str]] = METHOD_ROLES) -> None:
        self.table = table
        self.roles = roles

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        roles = _roles_for(method, self.roles)
        if roles is PUBLIC:
            return handler
        token = _token_of(details.invocation_metadata)
        caller = self.table.get(token) if token else None
        if caller is None:
            why = ("no bearer token: send metadata 'authorization: Bearer TOKEN' (kvpool: --token, KVPOOL_TOKEN "
                   "or KVPOOL_TOKEN_FILE)") if not token else "the bearer token is not one this server accepts"
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, f"{method}: {why}")
        if caller.role not in roles:
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED,
                           f"{method}: a {caller.role} token may not call this; it needs a "
                           f"{' or '.join(sorted(roles))} token")
        return _as(caller, handler) if handler is not None else None


def resolve_token(token: str | None = None, token_file: str | None = None,
                  environ: Mapping[str, str] | None = None) -> str | None:
    """The token to send: ``token``, else the first line of ``token_file``, else
    ``$KVPOOL_TOKEN``, else the file ``$KVPOOL_TOKEN_FILE``; None when none is given."""
    env = os.environ if environ is None else environ
    if token:
        return token.strip()
    path = token_file
    if not path:
        if env.get("KVPOOL_TOKEN", "").strip():
            return env["KVPOOL_TOKEN"].strip()
        path = env.get("KVPOOL_TOKEN_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = f.readline().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"the token file {path} is empty")
    return value


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a port on this machine (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
