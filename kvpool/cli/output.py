"""How admin commands talk to the master and print: tables for people, JSON for scripts.

:func:`admin_channel` opens the Admin service at ``--address``; :func:`call` makes one RPC
that waits up to ``--timeout`` for a master that is still starting (gRPC wait-for-ready),
and :func:`rpc_failure` turns a failed RPC into the message and exit code every admin
command uses: 2 when the master cannot be reached (naming the address), 1 when it refused.

The channel carries the caller's credentials (common flags, kvpool.cli.flags): the bearer
token of ``--token`` / ``--token-file`` (or ``KVPOOL_TOKEN`` / ``KVPOOL_TOKEN_FILE``) on every
call, and TLS when ``--tls-ca`` (or ``KVPOOL_TLS_CA``) is given, with ``--tls-cert`` and
``--tls-key`` as the client certificate for mutual TLS.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from kvpool.auth import bearer_metadata, resolve_token
from kvpool.rpc.v1 import admin_pb2_grpc
from kvpool.tls import TlsFiles, open_channel

__all__ = ["admin_channel", "call", "rpc_failure", "on_leader", "at_leader", "table", "pct", "to_json"]

_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                 "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    """grpc.ClientCallDetails has no constructor of its own."""


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call on the channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, d):
        return _Details(d.method, d.timeout, tuple(d.metadata or ()) + self._metadata, d.credentials,
                        d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def credentials(args: argparse.Namespace) -> tuple[str | None, TlsFiles | None]:
    """The token and TLS files of the common flags, else of the environment."""
    token = resolve_token(getattr(args, "token", None), getattr(args, "token_file", None))
    env = os.environ
    tls = TlsFiles(getattr(args, "tls_cert", None) or env.get("KVPOOL_TLS_CERT", ""),
                   getattr(args, "tls_key", None) or env.get("KVPOOL_TLS_KEY", ""),
                   getattr(args, "tls_ca", None) or env.get("KVPOOL_TLS_CA", ""))
    return token, tls if tls.ca else None


def admin_channel(args: argparse.Namespace) -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
    """The Admin service at ``--address``, with the caller's token and TLS.

    A token file that cannot be read ends the command with exit code 2, saying why.
    """
    try:
        token, tls = credentials(args)
    except ValueError as exc:
        print(f"kvpool: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    channel = open_channel(args.address, tls, options=_OPTIONS)
    metadata = bearer_metadata(token)
    if metadata:
        channel = grpc.intercept_channel(channel, _Bearer(metadata))
    return channel, admin_pb2_grpc.AdminStub(channel)


def call(method, request, args: argparse.Namespace, timeout: float | None = None):
    """One RPC; a master that is starting gets until the deadline to answer."""
    return method(request, timeout=timeout or args.timeout, wait_for_ready=True)


def rpc_failure(exc: grpc.RpcError, args: argparse.Namespace, what: str) -> int:
    code, details = exc.code(), exc.details() or ""
    # gRPC's own words when no connection was made; kvpool's UNAVAILABLE statuses say more.
    unreachable = code == grpc.StatusCode.DEADLINE_EXCEEDED or (
        code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower())
    if unreachable:
        print(f"kvpool {what}: cannot reach the master at {args.address} within {args.timeout:g}s "
              f"({exc.details()}); is `kvpool serve` running there? set --address or KVPOOL_ADDRESS",
              file=sys.stderr)
        return 2
    print(f"kvpool {what}: {code.name}: {exc.details()}", file=sys.stderr)
    return 1


def on_leader(args: argparse.Namespace, run_at):
    """Run a command on the master at ``--address``; given several (``a:p,b:p``), on their
    leader. ``run_at(args)`` makes the calls and returns its result (an exit status, an
    answer), which this returns; or, when ``args.follow_leader`` is set, the RpcError of a
    master that does not lead or answer (:func:`leader_error` says which): then the next
    master is tried."""
    import time

    from kvpool.masters import FAILOVER_S, MasterList

    masters = MasterList(args.address)
    if not masters.several:
        return run_at(args)
    deadline = time.monotonic() + FAILOVER_S
    while True:
        one = argparse.Namespace(**vars(args))
        # Each try is short: a dead master must not hold the command for the whole --timeout.
        one.address, one.timeout = masters.current, min(args.timeout, 2.0)
        one.follow_leader = time.monotonic() < deadline
        result = run_at(one)
        if not isinstance(result, grpc.RpcError):
            return result
        masters.failed(result)
        time.sleep(0.1)


def at_leader(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` aimed at the leader of ``--address``'s masters, for commands that make many
    calls (a drain, ``top``): they find the leader once, the way :func:`on_leader` does,
    then talk to it. With one address, ``args`` as they are; when no master answers, the
    last one tried (its error is the command's to report)."""
    from kvpool.masters import MasterList
    from kvpool.rpc.v1 import common_pb2

    if not MasterList(args.address).several:
        return args

    def probe(at: argparse.Namespace):
        channel, stub = admin_channel(at)
        try:
            call(stub.Stats, common_pb2.StatsRequest(), at)
            return at
        except grpc.RpcError as exc:
            return exc if leader_error(exc, at) else at
        finally:
            channel.close()

    found = on_leader(args, probe)
    return argparse.Namespace(**{**vars(args), "address": found.address})


def leader_error(exc: grpc.RpcError, args: argparse.Namespace) -> bool:
    """Whether ``on_leader`` should try another master after ``exc``."""
    from kvpool.masters import follows

    return getattr(args, "follow_leader", False) and (follows(exc) or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(n: float, d: float) -> str:
    return f"{100.0 * n / d:.1f}%" if d else "-"


def to_json(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
