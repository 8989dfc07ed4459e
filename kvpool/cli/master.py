"""``kvpool master``: a master alone; storage nodes join it with ``kvpool node --master``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from kvpool.cli.flags import add_config_flag, add_master_flags, run_until_signal, settings_from_args, setup_logging
from kvpool.cli.flags import mark_server_command
from kvpool.config import MasterSettings

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("master", help="run a master; nodes join it with `kvpool node --master`",
                       description="Run a master: metadata only. Storage nodes register with it.")
    add_config_flag(p)
    add_master_flags(p)
    mark_server_command(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(MasterSettings, args)
    except (ValueError, OSError) as exc:
        print(f"kvpool master: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from kvpool.server import PoolServer

    try:
        asyncio.run(run_until_signal(PoolServer(settings), "master"))
    except OSError as exc:
        print(f"kvpool master: {exc}", file=sys.stderr)
        return 1
    return 0
