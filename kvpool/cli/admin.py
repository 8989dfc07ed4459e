"""``kvpool admin``: operators' commands over the Admin gRPC service.

    kvpool admin stats [--json] [--address HOST:PORT] [--timeout S]
    kvpool admin nodes
    kvpool admin ls [--namespace ID] [--tenant NAME] [--limit N] [--offset N]
    kvpool admin inspect KEY [--tenant NAME]
    kvpool admin evict (--bytes SIZE | --all)
    kvpool admin flush [--namespace ID]
    kvpool admin drain NODE [--drop] [--resume]       (kvpool.cli.drain)
    kvpool admin namespaces [--namespace ID] [--set-replicas N]   (kvpool.cli.namespaces)
    kvpool admin top [--interval S] [--count N]        (kvpool.cli.top)

The common flags (``--address``, ``--json``, ``--timeout``, and the credentials ``--token``,
``--token-file``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``) go anywhere on the line
(kvpool.cli.flags). Human-readable tables by default; ``--json`` prints one JSON document
instead. Long operations show progress on a terminal, never under ``--json``.
Exit codes: 0 ok, 1 the server refused (message on stderr), 2 bad usage or unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from kvpool.cli import drain, namespaces, top
from kvpool.cli.output import admin_channel, call, leader_error, on_leader, pct, rpc_failure, table, to_json
from kvpool.cli.progress import busy
from kvpool.config import format_size, parse_size
from kvpool.rpc.v1 import admin_pb2, common_pb2
from kvpool.wire import TIER_NAMES

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("admin", help="inspect and manage a running pool",
                       description="Inspect and manage a running pool over gRPC.")
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
    drain.register(cmds)
    namespaces.register(cmds)
    top.register(cmds)
    p.set_defaults(func=run)


def _show_stats(s: common_pb2.StatsResponse) -> str:
    lookups = s.hit_blocks + s.miss_blocks
    summary = table(["metric", "value"], [
        ["blocks", s.blocks], ["bytes", format_size(s.bytes)],
        ["hit rate (blocks)", f"{pct(s.hit_blocks, lookups)} ({s.hit_blocks} of {lookups})"],
        ["puts (blocks)", s.put_blocks], ["deduplicated", s.dedup_blocks], ["evictions", s.evictions],
        ["demotions", s.demoted_blocks], ["promotions", s.promoted_blocks],
        ["written through", s.written_through_blocks], ["corrupt (dropped)", s.corrupt_blocks],
        ["pending grants", s.pending_grants], ["active leases", s.active_leases],
        ["namespaces", s.namespaces], ["nodes", s.nodes], ["eviction policy", s.eviction_policy],
        ["uptime", f"{s.uptime_seconds:.0f}s"],
        ["metadata", s.metadata_store + (f" (fencing epoch {s.fencing_epoch})" if s.fencing_epoch else "")],
    ])
    text = summary + "\n\n" + tier_table(s)
    if s.tenants:
        text += "\n\n" + tenant_table(s)
    return text


def tier_table(s: common_pb2.StatsResponse) -> str:
    return table(["node", "tier", "blocks", "used", "capacity", "use%", "evictions"], [
        [t.node_name or t.node_id, t.tier, t.blocks, format_size(t.used_bytes), format_size(t.capacity_bytes),
         pct(t.used_bytes, t.capacity_bytes), t.evictions] for t in s.tiers
    ])


def tenant_table(s: common_pb2.StatsResponse) -> str:
    """Use per tenant and tier, against its quota (--quotas)."""
    return table(["tenant", "tier", "blocks", "used", "quota", "use%"], [
        [t.tenant or "(default)", t.tier, t.blocks, format_size(t.used_bytes),
         format_size(t.quota_bytes) if t.HasField("quota_bytes") else "-",
         pct(t.used_bytes, t.quota_bytes) if t.HasField("quota_bytes") else "-"] for t in s.tenants
    ])


def _block_rows(blocks) -> list[list]:
    return [[b.key.hex(), b.tenant or "-", b.namespace_id[:12], b.state, TIER_NAMES.get(b.tier, "?"), format_size(b.size),
             b.leases, b.hits, f"{b.idle_seconds:.0f}s"] for b in blocks]


_BLOCK_HEADERS = ["key", "tenant", "namespace", "state", "tier", "size", "leases", "hits", "idle"]


def run(args: argparse.Namespace) -> int:
    """Run the command on the master at --address; given several (``a:p,b:p``), on their leader."""
    return on_leader(args, _run_at)


def _run_at(args: argparse.Namespace):
    """The exit status; or, when following the leader, the error of a master that does not
    lead (or does not answer)."""
    channel, stub = admin_channel(args)
    try:
        cmd = args.admin_command
        if cmd == "stats":
            resp = call(stub.Stats, common_pb2.StatsRequest(), args)
            text = _show_stats(resp)
        elif cmd == "nodes":
            resp = call(stub.ListNodes, admin_pb2.ListNodesRequest(), args)
            text = table(["id", "name", "where", "data", "heartbeat", "tiers"], [
                [n.node_id, n.name, "in process" if n.in_process else n.control_address,
                 " ".join(sorted(k if k != "tcp" else f"tcp {v}" for k, v in n.transports.items() if k != "host")),
                 "-" if n.in_process else f"{n.seconds_since_heartbeat:.1f}s ago",
                 ", ".join(f"{t.tier} {format_size(t.used_bytes)}/{format_size(t.capacity_bytes)}" for t in n.tiers)
                 + (" (draining)" if n.draining else "")]
                for n in resp.nodes])
        elif cmd == "ls":
            resp = call(stub.ListBlocks, admin_pb2.ListBlocksRequest(limit=args.limit, offset=args.offset,
                                                                     namespace_id=args.namespace, tenant=args.tenant),
                        args)
            text = table(_BLOCK_HEADERS, _block_rows(resp.blocks)) + f"\n({len(resp.blocks)} of {resp.total} blocks)"
        elif cmd == "inspect":
            try:
                key = bytes.fromhex(args.key)
            except ValueError:
                print(f"kvpool admin inspect: {args.key!r} is not hex; a key is 32 hex digits", file=sys.stderr)
                return 2
            resp = call(stub.Inspect, admin_pb2.InspectRequest(key=key, tenant=args.tenant), args)
            b = resp.block
            text = table(["field", "value"], [
                ["key", b.key.hex()], ["tenant", b.tenant or "-"], ["namespace", b.namespace_id], ["state", b.state],
                ["node", b.node_id],
                ["tier", TIER_NAMES.get(b.tier, "?")], ["offset", b.offset], ["size", f"{b.size} ({format_size(b.size)})"],
                ["checksum", f"{b.checksum:016x}"], ["leases", b.leases], ["hits", b.hits],
                ["position", b.position], ["age", f"{b.age_seconds:.1f}s"], ["idle", f"{b.idle_seconds:.1f}s"],
                ["copies", "; ".join(f"node {c.node_id}: {'+'.join(TIER_NAMES.get(t, '?') for t in c.tiers)}"
                                     for c in b.copies)],
            ])
        elif cmd == "evict":
            try:
                want = 0 if args.all else parse_size(args.evict_bytes)
            except ValueError as exc:
                print(f"kvpool admin evict: {exc}", file=sys.stderr)
                return 2
            with busy(args, "evicting"):
                resp = call(stub.Evict, admin_pb2.EvictRequest(bytes=want, all=args.all), args)
            text = (f"evicted {resp.blocks} blocks ({format_size(resp.bytes)}); "
                    f"{resp.skipped_leased} leased blocks kept")
        elif cmd == "flush":
            with busy(args, "flushing"):
                resp = call(stub.Flush, admin_pb2.FlushRequest(namespace_id=args.namespace), args)
            text = f"removed {resp.removed} blocks; {resp.deferred} leased blocks go when released"
        else:  # argparse prevents this
            return 2
    except grpc.RpcError as exc:
        if leader_error(exc, args):
            return exc
        return rpc_failure(exc, args, f"admin {args.admin_command}")
    finally:
        channel.close()
    if args.json:
        print(json.dumps(to_json(resp), sort_keys=True))
    else:
        print(text)
    return 0
