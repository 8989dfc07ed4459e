"""``kvpool serve``: the embedded default, a master and a node in one process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kvpool.config import ServeSettings, resolve_settings

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("serve", help="run a master and a node in one process (the embedded default)",
                       description="Run a master and a node in one process. Flags override the TOML "
                       "file (--config), which overrides KVPOOL_* environment variables.")
    p.add_argument("--config", help="TOML file of settings (also KVPOOL_CONFIG)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464; 0 picks, -1 disables)")
    p.add_argument("--dram", help="DRAM tier size, e.g. 4GiB (default 4GiB)")
    p.add_argument("--hbm", help="HBM tier size on the GPU, e.g. 8GiB (default 0: off; needs CUDA)")
    p.add_argument("--nvme", help="NVMe tier size in DATA_DIR/nvme, e.g. 64GiB (default 0: off)")
    p.add_argument("--write-through", choices=("true", "false"), help="also copy every committed block to NVMe")
    p.add_argument("--data-dir", help="directory for the node's files (default ./kvpool-data)")
    p.add_argument("--node-name", help="node name in stats and metrics (default: hostname)")
    p.add_argument("--slab-bytes", help="slab chunk size = largest block (default 64MiB)")
    p.add_argument("--prefault", choices=("true", "false"), help="touch all DRAM pages at start (default true)")
    p.add_argument("--eviction-policy", help="eviction policy: paced (default) or lru")
    p.add_argument("--high-watermark", type=float, help="start evicting above this fraction (default 0.95)")
    p.add_argument("--low-watermark", type=float, help="evict down to this fraction (default 0.90)")
    p.add_argument("--lease-ttl", type=float, help="seconds a read lease lives (default 30)")
    p.add_argument("--grant-ttl", type=float, help="seconds a put grant lives (default 30)")
    p.add_argument("--max-batch", type=int, help="most keys in one RPC (default 65536)")
    p.add_argument("--log-level", help="debug, info, warning (default info)")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    return resolve_settings(ServeSettings, flags, config_path=args.config)


async def _serve(settings: ServeSettings) -> None:
    from kvpool.server import PoolServer

    server = PoolServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        logging.getLogger("kvpool.serve").info("shutting down")
    finally:
        await server.stop()


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"kvpool serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvpool.tiers.hbm import HbmUnavailableError

    try:
        asyncio.run(_serve(settings))
    except (MemoryError, OSError, HbmUnavailableError) as exc:
        print(f"kvpool serve: {exc}", file=sys.stderr)
        return 1
    return 0
