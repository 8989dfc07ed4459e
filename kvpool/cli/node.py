"""``kvpool node``: a storage node that registers with a master (``--master HOST:PORT``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from kvpool.cli.flags import add_config_flag, add_tier_flags, add_token_flags, run_until_signal, settings_from_args, \
    setup_logging
from kvpool.cli.flags import mark_server_command
from kvpool.config import NodeSettings

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("node", help="run a storage node that joins a master",
                       description="Run a storage node (DRAM, and optionally HBM and NVMe) that "
                       "registers with a master and serves clients' data-plane copies.")
    add_config_flag(p)
    p.add_argument("--master", help="master address host:port, or several masters sharing a Redis "
                   "(host:port,host:port: the node follows their leader) (default 127.0.0.1:50051)")
    p.add_argument("--host", help="address of this node's control service (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port of this node's control service (default 50061; 0 picks)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port of this node's tier metrics (default -1: off)")
    p.add_argument("--metrics-host", help="address of that port, which has no authentication (default: --host)")
    add_tier_flags(p)
    add_token_flags(p, serving=True)
    mark_server_command(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(NodeSettings, args)
    except (ValueError, OSError) as exc:
        print(f"kvpool node: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from kvpool.node.service import NodeServer
    from kvpool.tiers.hbm import HbmUnavailableError

    try:
        asyncio.run(run_until_signal(NodeServer(settings), "node"))
    except (MemoryError, OSError, HbmUnavailableError) as exc:
        print(f"kvpool node: {exc}", file=sys.stderr)
        return 1
    return 0
