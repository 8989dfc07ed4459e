"""``kvpool serve``: the embedded default, a master and a node in one process."""

from __future__ import annotations

import argparse
import asyncio
import sys

from kvpool.cli.flags import add_config_flag, add_master_flags, add_tier_flags, run_until_signal, \
    settings_from_args, setup_logging
from kvpool.cli.flags import mark_server_command
from kvpool.config import ServeSettings

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("serve", help="run a master and a node in one process (the embedded default)",
                       description="Run a master and a node in one process. Flags override the TOML "
                       "file (--config), which overrides KVPOOL_* environment variables.")
    add_config_flag(p)
    add_master_flags(p)
    add_tier_flags(p)
    mark_server_command(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(ServeSettings, args)
    except (ValueError, OSError) as exc:
        print(f"kvpool serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from kvpool.server import PoolServer
    from kvpool.tiers.hbm import HbmUnavailableError

    try:
        asyncio.run(run_until_signal(PoolServer(settings, settings), "serve"))
    except (MemoryError, OSError, HbmUnavailableError) as exc:
        print(f"kvpool serve: {exc}", file=sys.stderr)
        return 1
    return 0
