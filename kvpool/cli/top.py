"""``kvpool admin top``: a live view of a running pool, refreshed every ``--interval`` seconds.

Each frame shows, over the last interval: the hit rate of Lookup/Get blocks, blocks looked up
and committed per second, bytes committed per second, and evictions; then the use of each
tier of each node. On a terminal the frame redraws in place; otherwise frames follow one
another. ``--json`` prints one JSON object per interval (JSON lines), for scripts.
``--count N`` stops after N frames (default: until Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc

from kvpool.cli.output import admin_channel, at_leader, call, pct, rpc_failure, table
from kvpool.config import format_size
from kvpool.rpc.v1 import common_pb2

__all__ = ["register", "run", "frame"]

_CLEAR = "\x1b[H\x1b[2J"


def register(cmds) -> None:
    p = cmds.add_parser("top", help="live hit rate, throughput and tier use",
                        description="A live view of hit rate, throughput and tier use.")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    p.add_argument("--count", type=int, default=0, help="stop after this many frames (default: never)")
    p.set_defaults(func=run)


def rates(prev: common_pb2.StatsResponse, cur: common_pb2.StatsResponse, seconds: float) -> dict:
    """What changed between two Stats answers, per second (and the interval's hit rate)."""
    hits = cur.hit_blocks - prev.hit_blocks
    looked = hits + cur.miss_blocks - prev.miss_blocks
    per_s = 1.0 / seconds if seconds > 0 else 0.0
    return {
        "interval_s": round(seconds, 3),
        "hit_rate": hits / looked if looked else None,
        "lookup_blocks_per_s": looked * per_s,
        "hit_blocks_per_s": hits * per_s,
        "put_blocks_per_s": (cur.put_blocks - prev.put_blocks) * per_s,
        "put_bytes_per_s": (cur.put_bytes - prev.put_bytes) * per_s,
        "evictions_per_s": (cur.evictions - prev.evictions) * per_s,
    }


def frame(address: str, cur: common_pb2.StatsResponse, r: dict) -> str:
    lookups = cur.hit_blocks + cur.miss_blocks
    hit = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
    head = (f"kvpool top  {address}  up {cur.uptime_seconds:.0f}s  nodes {cur.nodes}  "
            f"leases {cur.active_leases}  pending {cur.pending_grants}\n"
            f"hit rate {hit} (all time {pct(cur.hit_blocks, lookups)})  "
            f"lookups {r['lookup_blocks_per_s']:.0f} blk/s  hits {r['hit_blocks_per_s']:.0f} blk/s  "
            f"puts {r['put_blocks_per_s']:.0f} blk/s ({format_size(r['put_bytes_per_s'])}/s)  "
            f"evictions {r['evictions_per_s']:.0f}/s  corrupt {cur.corrupt_blocks}")
    tiers = table(["node", "tier", "blocks", "used", "capacity", "use%"], [
        [t.node_name or t.node_id, t.tier, t.blocks, format_size(t.used_bytes), format_size(t.capacity_bytes),
         pct(t.used_bytes, t.capacity_bytes)] for t in cur.tiers])
    return head + "\n\n" + tiers


def run(args: argparse.Namespace) -> int:
    args = at_leader(args)
    channel, stub = admin_channel(args)
    tty = sys.stdout.isatty() and not args.json
    shown = 0
    try:
        prev, t_prev = call(stub.Stats, common_pb2.StatsRequest(), args), time.monotonic()
        while not args.count or shown < args.count:
            time.sleep(args.interval)
            cur, now = call(stub.Stats, common_pb2.StatsRequest(), args), time.monotonic()
            r = rates(prev, cur, now - t_prev)
            if args.json:
                print(json.dumps({**r, "tiers": [{"node": t.node_name, "tier": t.tier, "used_bytes": t.used_bytes,
                                                  "capacity_bytes": t.capacity_bytes, "blocks": t.blocks}
                                                 for t in cur.tiers]}), flush=True)
            else:
                print((_CLEAR if tty else ("\n" if shown else "")) + frame(args.address, cur, r), flush=True)
            prev, t_prev = cur, now
            shown += 1
    except grpc.RpcError as exc:
        return rpc_failure(exc, args, "admin top")
    except KeyboardInterrupt:
        pass
    finally:
        channel.close()
    return 0
