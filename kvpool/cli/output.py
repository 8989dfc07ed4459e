"""How admin commands talk to the master and print: tables for people, JSON for scripts.

:func:`admin_channel` opens the Admin service at ``--address``; :func:`call` makes one RPC
that waits up to ``--timeout`` for a master that is still starting (gRPC wait-for-ready),
and :func:`rpc_failure` turns a failed RPC into the message and exit code every admin
command uses: 2 when the master cannot be reached (naming the address), 1 when it refused.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from kvpool.rpc.v1 import admin_pb2_grpc

__all__ = ["admin_channel", "call", "rpc_failure", "table", "pct", "to_json"]

_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


def admin_channel(args: argparse.Namespace) -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
    channel = grpc.insecure_channel(args.address, options=_OPTIONS)
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
