"""``kvpool admin``: operators' commands over the Admin gRPC service.

    kvpool admin [--address HOST:PORT] [--json] stats
    kvpool admin nodes
    kvpool admin ls [--namespace ID] [--tenant NAME] [--limit N] [--offset N]
    kvpool admin inspect KEY [--tenant NAME]
    kvpool admin evict (--bytes SIZE | --all)
    kvpool admin flush [--namespace ID]

Human-readable tables by default; ``--json`` prints one JSON document instead.
Exit codes: 0 ok, 1 the server refused (message on stderr), 2 bad usage or unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from kvpool.auth import bearer_metadata, resolve_token
from kvpool.cli.flags import add_token_flags
from kvpool.config import format_size, parse_size
from kvpool.tls import TlsFiles, open_channel
from kvpool.rpc.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from kvpool.wire import TIER_NAMES

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("admin", help="inspect and manage a running pool",
                       description="Inspect and manage a running pool over gRPC.")
    p.add_argument("--address", default=os.environ.get("KVPOOL_ADDRESS", "127.0.0.1:50051"),
                   help="master address host:port (default $KVPOOL_ADDRESS or 127.0.0.1:50051)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    add_token_flags(p)
    cmds = p.add_subparsers(dest="admin_command", metavar="COMMAND")
    cmds.required = True
    cmds.add_parser("stats", help="pool usage, hits and evictions")
    cmds.add_parser("nodes", help="storage nodes, their tiers and heartbeats")
    ls = cmds.add_parser("ls", help="list blocks")
    ls.add_argument("--namespace", default="", help="only this namespace id")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--tenant", help="only this tenant's blocks (\"\" is the default tenant)")
    ins = cmds.add_parser("inspect", help="show one block")
    ins.add_argument("key", help="block key, 32 hex digits")
    ins.add_argument("--tenant", default="", help="the tenant whose key it is (default: the default tenant)")
    ev = cmds.add_parser("evict", help="evict blocks through the eviction policy")
    group = ev.add_mutually_exclusive_group(required=True)
    group.add_argument("--bytes", dest="evict_bytes", help="free at least this much, e.g. 1GiB")
    group.add_argument("--all", action="store_true", help="evict everything not leased")
    fl = cmds.add_parser("flush", help="delete all unleased blocks (of one namespace)")
    fl.add_argument("--namespace", default="")
    p.set_defaults(func=run)


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.1f}%" if d else "-"


def _show_stats(s: common_pb2.StatsResponse) -> str:
    lookups = s.hit_blocks + s.miss_blocks
    summary = _table(["metric", "value"], [
        ["blocks", s.blocks], ["bytes", format_size(s.bytes)],
        ["hit rate (blocks)", f"{_pct(s.hit_blocks, lookups)} ({s.hit_blocks} of {lookups})"],
        ["puts (blocks)", s.put_blocks], ["deduplicated", s.dedup_blocks], ["evictions", s.evictions],
        ["demotions", s.demoted_blocks], ["promotions", s.promoted_blocks],
        ["written through", s.written_through_blocks], ["corrupt (dropped)", s.corrupt_blocks],
        ["pending grants", s.pending_grants], ["active leases", s.active_leases],
        ["namespaces", s.namespaces], ["nodes", s.nodes], ["eviction policy", s.eviction_policy],
        ["uptime", f"{s.uptime_seconds:.0f}s"],
    ])
    tiers = _table(["node", "tier", "blocks", "used", "capacity", "use%", "evictions"], [
        [t.node_name or t.node_id, t.tier, t.blocks, format_size(t.used_bytes), format_size(t.capacity_bytes),
         _pct(t.used_bytes, t.capacity_bytes), t.evictions] for t in s.tiers
    ])
    if not s.tenants:
        return summary + "\n\n" + tiers
    tenants = _table(["tenant", "tier", "blocks", "used", "quota", "use%"], [
        [t.tenant or "(default)", t.tier, t.blocks, format_size(t.used_bytes),
         format_size(t.quota_bytes) if t.HasField("quota_bytes") else "-",
         _pct(t.used_bytes, t.quota_bytes) if t.HasField("quota_bytes") else "-"] for t in s.tenants
    ])
    return summary + "\n\n" + tiers + "\n\n" + tenants


def _block_rows(blocks) -> list[list]:
    return [[b.key.hex(), b.tenant or "-", b.namespace_id[:12], b.state, TIER_NAMES.get(b.tier, "?"), format_size(b.size),
             b.leases, b.hits, f"{b.idle_seconds:.0f}s"] for b in blocks]


_BLOCK_HEADERS = ["key", "tenant", "namespace", "state", "tier", "size", "leases", "hits", "idle"]


def _to_json(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def run(args: argparse.Namespace) -> int:
    try:
        token = resolve_token(args.token, args.token_file)
    except ValueError as exc:
        print(f"kvpool admin: {exc}", file=sys.stderr)
        return 2
    env = os.environ
    tls = TlsFiles(args.tls_cert or env.get("KVPOOL_TLS_CERT", ""), args.tls_key or env.get("KVPOOL_TLS_KEY", ""),
                   args.tls_ca or env.get("KVPOOL_TLS_CA", ""))
    channel = open_channel(args.address, tls)
    stub = admin_pb2_grpc.AdminStub(channel)
    kw = {"timeout": args.timeout, "metadata": bearer_metadata(token)}
    try:
        cmd = args.admin_command
        if cmd == "stats":
            resp = stub.Stats(common_pb2.StatsRequest(), **kw)
            text = _show_stats(resp)
        elif cmd == "nodes":
            resp = stub.ListNodes(admin_pb2.ListNodesRequest(), **kw)
            text = _table(["id", "name", "where", "data", "heartbeat", "tiers"], [
                [n.node_id, n.name, "in process" if n.in_process else n.control_address,
                 " ".join(sorted(k if k != "tcp" else f"tcp {v}" for k, v in n.transports.items() if k != "host")),
                 "-" if n.in_process else f"{n.seconds_since_heartbeat:.1f}s ago",
                 ", ".join(f"{t.tier} {format_size(t.used_bytes)}/{format_size(t.capacity_bytes)}" for t in n.tiers)]
                for n in resp.nodes])
        elif cmd == "ls":
            resp = stub.ListBlocks(admin_pb2.ListBlocksRequest(limit=args.limit, offset=args.offset,
                                                               namespace_id=args.namespace, tenant=args.tenant), **kw)
            text = _table(_BLOCK_HEADERS, _block_rows(resp.blocks)) + f"\n({len(resp.blocks)} of {resp.total} blocks)"
        elif cmd == "inspect":
            try:
                key = bytes.fromhex(args.key)
            except ValueError:
                print(f"kvpool admin inspect: {args.key!r} is not hex; a key is 32 hex digits", file=sys.stderr)
                return 2
            resp = stub.Inspect(admin_pb2.InspectRequest(key=key, tenant=args.tenant), **kw)
            b = resp.block
            text = _table(["field", "value"], [
                ["key", b.key.hex()], ["tenant", b.tenant or "-"], ["namespace", b.namespace_id], ["state", b.state], ["node", b.node_id],
                ["tier", TIER_NAMES.get(b.tier, "?")], ["offset", b.offset], ["size", f"{b.size} ({format_size(b.size)})"],
                ["checksum", f"{b.checksum:016x}"], ["leases", b.leases], ["hits", b.hits],
                ["position", b.position], ["age", f"{b.age_seconds:.1f}s"], ["idle", f"{b.idle_seconds:.1f}s"],
            ])
        elif cmd == "evict":
            try:
                want = 0 if args.all else parse_size(args.evict_bytes)
            except ValueError as exc:
                print(f"kvpool admin evict: {exc}", file=sys.stderr)
                return 2
            resp = stub.Evict(admin_pb2.EvictRequest(bytes=want, all=args.all), **kw)
            text = (f"evicted {resp.blocks} blocks ({format_size(resp.bytes)}); "
                    f"{resp.skipped_leased} leased blocks kept")
        elif cmd == "flush":
            resp = stub.Flush(admin_pb2.FlushRequest(namespace_id=args.namespace), **kw)
            text = f"removed {resp.removed} blocks; {resp.deferred} leased blocks go when released"
        else:  # argparse prevents this
            return 2
    except grpc.RpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(f"kvpool admin: cannot reach {args.address} ({exc.details()}); is `kvpool serve` "
                  f"running? set --address or KVPOOL_ADDRESS", file=sys.stderr)
            return 2
        print(f"kvpool admin {args.admin_command}: {code.name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    if args.json:
        print(json.dumps(_to_json(resp), sort_keys=True))
    else:
        print(text)
    return 0
