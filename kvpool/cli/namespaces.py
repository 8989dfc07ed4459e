"""``kvpool admin namespaces [--namespace ID] [--set-replicas N]``: namespaces and their settings.

Lists the registered namespaces with the copies their blocks get (``replicas``: the
namespace's own setting, or the pool default marked "(default)"). With ``--set-replicas N``
and ``--namespace ID``, sets the namespace's replicas first: raising it copies the blocks it
has already (within a few sweeps), lowering it frees the extra copies of unleased blocks.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from kvpool.cli.output import admin_channel, call, leader_error, on_leader, rpc_failure, table, to_json
from kvpool.config import format_size
from kvpool.rpc.v1 import admin_pb2

__all__ = ["register", "run"]


def register(cmds) -> None:
    p = cmds.add_parser("namespaces", help="registered namespaces and their settings (replicas)",
                        description="List the registered namespaces with their settings; --set-replicas "
                        "changes how many copies a namespace's blocks get.")
    p.add_argument("--namespace", default="", help="only this namespace id (needed with --set-replicas)")
    p.add_argument("--set-replicas", type=int, metavar="N",
                   help="keep N copies (1-8) of each block of --namespace, on nodes of different hosts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.set_replicas is not None and not args.namespace:
        print("kvpool admin namespaces: --set-replicas needs --namespace ID (see kvpool admin namespaces)",
              file=sys.stderr)
        return 2
    req = admin_pb2.NamespacesRequest(namespace_id=args.namespace)
    if args.set_replicas is not None:
        if not 0 <= args.set_replicas < 2**32:
            print(f"kvpool admin namespaces: --set-replicas must be between 1 and 8; got {args.set_replicas}",
                  file=sys.stderr)
            return 2
        req.set_replicas = args.set_replicas
    resp = on_leader(args, lambda at: _ask(at, req))
    if isinstance(resp, int):
        return resp
    if args.json:
        print(json.dumps(to_json(resp), sort_keys=True))
        return 0
    if args.set_replicas is not None:
        print(f"namespace {args.namespace[:16]} now keeps {args.set_replicas} "
              f"{'copy' if args.set_replicas == 1 else 'copies'} of each block")
    print(table(["namespace", "model", "tenant", "block", "blocks", "replicas"], [
        [n.namespace_id[:16], n.model, n.tenant or "-", format_size(n.block_bytes), n.blocks,
         f"{n.replicas}" + (" (default)" if n.replicas_default else "")]
        for n in resp.namespaces]) + f"\n(pool default: {resp.default_replicas} "
          f"{'copy' if resp.default_replicas == 1 else 'copies'} of each block)")
    return 0


def _ask(args: argparse.Namespace, req):
    """The master's answer; an exit status if it failed (the error itself if another master
    should be asked: see kvpool.cli.output.on_leader)."""
    channel, stub = admin_channel(args)
    try:
        return call(stub.Namespaces, req, args)
    except grpc.RpcError as exc:
        if leader_error(exc, args):
            return exc
        return rpc_failure(exc, args, "admin namespaces")
    finally:
        channel.close()
