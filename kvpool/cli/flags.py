"""Flags shared by `kvpool serve`, `kvpool master` and `kvpool node`, and how they become settings.

Every flag has a setting of the same name in TOML (``--metrics-port`` = ``metrics_port``) and
in the environment (``KVPOOL_METRICS_PORT``); flags win over the file, which wins over the
environment. Flags left unset are None here, so they never mask the file or the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kvpool.config import resolve_settings

__all__ = ["add_config_flag", "add_master_flags", "add_tier_flags", "add_token_flags", "add_tls_flags",
           "settings_from_args",
           "setup_logging", "run_until_signal"]


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file of settings (also KVPOOL_CONFIG)")
    p.add_argument("--log-level", help="debug, info, warning (default info)")


def add_master_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("master")
    g.add_argument("--host", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    g.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464; 0 picks, -1 disables)")
    g.add_argument("--eviction-policy", help="eviction policy: paced (default) or lru")
    g.add_argument("--high-watermark", type=float, help="start evicting/demoting above this fraction (default 0.95)")
    g.add_argument("--low-watermark", type=float, help="evict/demote down to this fraction (default 0.90)")
    g.add_argument("--lease-ttl", type=float, help="seconds a read lease lives (default 30)")
    g.add_argument("--grant-ttl", type=float, help="seconds a put grant lives (default 30)")
    g.add_argument("--max-batch", type=int, help="most keys in one RPC (default 65536)")
    g.add_argument("--write-through", choices=("true", "false"), help="also copy every committed block to NVMe")
    g.add_argument("--heartbeat-interval", type=float, help="seconds between node heartbeats (default 1)")
    g.add_argument("--quotas", help="byte quotas per tenant and memory tier, e.g. 'alice:dram=8GiB,bob:dram=2GiB'")
    g.add_argument("--max-message-bytes", help="largest gRPC request accepted, e.g. 64MiB (default); larger "
                   "ones are refused before they are read")
    g = p.add_argument_group("security")
    g.add_argument("--auth-tokens", metavar="FILE", help="bearer tokens, one 'TOKEN ROLE [TENANT]' a line "
                   "(roles: client, admin, node); required to listen beyond loopback")
    g.add_argument("--insecure", action="store_const", const=True, help="listen beyond loopback without tokens "
                   "(only where every host on the network is trusted)")
    add_tls_flags(g, serving=True)


def add_tls_flags(g, *, serving: bool = False) -> None:
    """TLS for gRPC and the TCP data plane (kvpool.tls)."""
    own = "serve TLS with this certificate (PEM)" if serving else "client certificate for mutual TLS (PEM)"
    g.add_argument("--tls-cert", help=own)
    g.add_argument("--tls-key", help="the certificate's private key (PEM)")
    g.add_argument("--tls-ca", help="CA bundle that signs the peers (PEM): " + (
        "clients must then present a certificate (mutual TLS)" if serving else "verify the server with it"))


def add_token_flags(p: argparse.ArgumentParser, *, serving: bool = False) -> None:
    """How a process proves who it is: a bearer token (kvpool.auth) and TLS (kvpool.tls). A
    ``serving`` process (a node) also listens, so it gets --insecure and server-side TLS."""
    g = p.add_argument_group("authentication")
    g.add_argument("--token", help="bearer token to send (also KVPOOL_TOKEN); prefer --token-file, since "
                   "command lines are visible to other users")
    g.add_argument("--token-file", help="file whose first line is the token (also KVPOOL_TOKEN_FILE)")
    if serving:
        g.add_argument("--insecure", action="store_const", const=True,
                       help="listen beyond loopback without a token (trusted networks only)")
        add_tls_flags(g, serving=True)
    else:
        add_tls_flags(g)


def add_tier_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage")
    g.add_argument("--dram", help="DRAM tier size, e.g. 4GiB (default 4GiB)")
    g.add_argument("--hbm", help="HBM tier size on the GPU, e.g. 8GiB (default 0: off; needs CUDA)")
    g.add_argument("--nvme", help="NVMe tier size in DATA_DIR/nvme, e.g. 64GiB (default 0: off)")
    g.add_argument("--data-dir", help="directory for the node's files (default ./kvpool-data)")
    g.add_argument("--node-name", help="node name in stats and metrics (default: hostname)")
    g.add_argument("--slab-bytes", help="slab chunk size = largest block (default 64MiB)")
    g.add_argument("--prefault", choices=("true", "false"), help="touch all DRAM pages at start (default true)")
    g = p.add_argument_group("data plane (clients on other hosts)")
    g.add_argument("--data-port", type=int, help="TCP data server port, on the --host address (default 0: a free "
                   "one, published through the master; -1: off, same-host clients only)")
    g.add_argument("--advertise-host", help="address other hosts use for this node's data plane (default: --host)")
    g.add_argument("--ucx", choices=("true", "false"), help="serve one-sided UCX GET/PUT too (needs kvpool[ucx]; "
                   "default false)")


def settings_from_args(cls, args: argparse.Namespace):
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    return resolve_settings(cls, flags, config_path=args.config)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def run_until_signal(server, name: str) -> None:
    """Start ``server``, wait for SIGTERM or SIGINT, then stop it (even if start failed)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        logging.getLogger(f"kvpool.{name}").info("shutting down")
    finally:
        await server.stop()
