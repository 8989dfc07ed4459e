"""``kvpool admin drain NODE [--drop] [--resume]``: empty a node before maintenance.

The master stops placing new blocks on NODE (a name or id from ``kvpool admin nodes``) and
moves its blocks to other nodes, node to node, a batch per Drain RPC, while this command
shows progress. ``--drop`` lets the blocks go instead. Blocks that readers lease move once
released; the command waits up to ``--wait`` seconds for them. The node stays drained (no
new blocks) until ``kvpool admin drain NODE --resume``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc

from kvpool.cli.output import admin_channel, at_leader, call, rpc_failure
from kvpool.cli.progress import bar
from kvpool.config import format_size
from kvpool.rpc.v1 import admin_pb2

__all__ = ["register", "run"]


def register(cmds) -> None:
    p = cmds.add_parser("drain", help="move a node's blocks elsewhere and stop new placement there",
                        description="Stop new placement on NODE and move its blocks to other nodes "
                        "(or drop them), with progress on a terminal.")
    p.add_argument("node", metavar="NODE", help="node name or id (see kvpool admin nodes)")
    p.add_argument("--drop", action="store_true", help="let the blocks go instead of moving them")
    p.add_argument("--resume", action="store_true", help="end the drain: the node takes new blocks again")
    p.add_argument("--batch", type=int, default=256, help="blocks per Drain call (default 256)")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for leased blocks to be released (default 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.batch < 2**32:
        print(f"kvpool admin drain: --batch must be a positive number of blocks; got {args.batch}", file=sys.stderr)
        return 2
    args = at_leader(args)
    channel, stub = admin_channel(args)
    totals = {"moved": 0, "moved_bytes": 0, "dropped": 0, "failed": 0}
    try:
        req = admin_pb2.DrainRequest(node=args.node, drop=args.drop, resume=args.resume, max_blocks=args.batch)
        resp = call(stub.Drain, req, args, timeout=max(args.timeout, 120.0))
        if args.resume:
            if args.json:
                print(json.dumps({"node": resp.node_name, "node_id": resp.node_id, "draining": resp.draining}))
            else:
                print(f"node {resp.node_name} takes new blocks again ({resp.remaining} blocks on it)")
            return 0
        progress = bar(args, resp.remaining + resp.moved + resp.dropped, f"draining {resp.node_name}")
        deadline = time.monotonic() + args.wait
        with progress:
            while True:
                for k in totals:
                    totals[k] += getattr(resp, k)
                progress.update(resp.moved + resp.dropped)
                if resp.remaining == 0:
                    break
                if resp.moved + resp.dropped == 0:
                    if resp.leased == 0 or time.monotonic() > deadline:
                        break  # nothing moves any more: report what is left
                    time.sleep(0.5)  # leased blocks move once their readers release them
                resp = call(stub.Drain, req, args, timeout=max(args.timeout, 120.0))
    except grpc.RpcError as exc:
        return rpc_failure(exc, args, "admin drain")
    finally:
        channel.close()
    done = resp.remaining == 0
    if args.json:
        print(json.dumps({"node": resp.node_name, "node_id": resp.node_id, "draining": resp.draining,
                          "remaining": resp.remaining, "leased": resp.leased, "first_error": resp.first_error,
                          **totals}, sort_keys=True))
    else:
        what = (f"dropped {totals['dropped']} blocks" if args.drop else
                f"moved {totals['moved']} blocks ({format_size(totals['moved_bytes'])}) to other nodes")
        print(f"node {resp.node_name}: {what}; {resp.remaining} left"
              + (f" ({resp.leased} leased)" if resp.leased else "")
              + f". It takes no new blocks until `kvpool admin drain {args.node} --resume`.")
    if not done:
        why = resp.first_error or (f"{resp.leased} blocks stayed leased for {args.wait:g}s" if resp.leased else
                                   "blocks could not be moved")
        print(f"kvpool admin drain: {resp.remaining} blocks remain on {resp.node_name}: {why}", file=sys.stderr)
        return 1
    return 0
