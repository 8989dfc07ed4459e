"""Flags shared by the subcommands.

Two kinds:

* **Server settings** of `kvpool serve`, `kvpool master` and `kvpool node`. Every such flag has
  a setting of the same name in TOML (``--metrics-port`` = ``metrics_port``) and in the
  environment (``KVPOOL_METRICS_PORT``); flags win over the file, which wins over the
  environment. Flags left unset are None here, so they never mask the file or the environment.
* **Common client flags** (:data:`COMMON_FLAGS`: ``--address``, ``--json``, ``--timeout``, ...)
  of every command that talks to a running pool. :func:`install_common_flags` adds them to the
  top-level parser and to every subcommand parser in the tree, so ``kvpool --json admin stats``,
  ``kvpool admin --json stats`` and ``kvpool admin stats --json`` mean the same, as in kubectl
  and docker. A subcommand registered later gets them without doing anything; one that runs
  a server opts out with :func:`mark_server_command`. A new common flag (``--token``) is one
  more :class:`CommonFlag` in the list.

How "before or after" works: only the top-level parser has real defaults. Every subparser
declares the same flags with ``default=argparse.SUPPRESS``, so a subparser sets an attribute
only when the user typed the flag there, and the value typed last (closest to the command) wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from kvpool.config import resolve_settings

__all__ = ["add_config_flag", "add_master_flags", "add_redis_flags", "add_tier_flags", "add_token_flags",
           "add_tls_flags", "settings_from_args", "setup_logging", "run_until_signal", "CommonFlag", "COMMON_FLAGS",
           "install_common_flags", "mark_server_command", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class CommonFlag:
    """One flag that every client command accepts before or after its subcommand.

    ``default`` is called when the parser is built, so environment variables are read then.
    ``kwargs`` go to ``add_argument`` as they are (help, type, action, metavar).
    """

    name: str
    default: Callable[[], Any]
    kwargs: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


COMMON_FLAGS: list[CommonFlag] = [
    CommonFlag("--address", lambda: os.environ.get("KVPOOL_ADDRESS", DEFAULT_ADDRESS),
               {"metavar": "HOST:PORT", "help": f"master address, or several masters sharing a Redis "
                f"(host:port,host:port: their leader answers) (default $KVPOOL_ADDRESS or {DEFAULT_ADDRESS})"}),
    CommonFlag("--json", lambda: False, {"action": "store_true", "help": "print one JSON document, no progress"}),
    CommonFlag("--timeout", lambda: float(os.environ.get("KVPOOL_TIMEOUT", "10")),
               {"type": float, "metavar": "SECONDS",
                "help": "seconds to wait for the server, including one that is still starting (default 10)"}),
    # Credentials (kvpool.auth, kvpool.tls): every client command sends them. The environment
    # variables are read where they are used (kvpool.cli.output.admin_channel), so a flag wins.
    CommonFlag("--token", lambda: None,
               {"help": "bearer token to send (also KVPOOL_TOKEN); prefer --token-file, since command lines "
                        "are visible to other users"}),
    CommonFlag("--token-file", lambda: None,
               {"metavar": "PATH", "help": "file whose first line is the token (also KVPOOL_TOKEN_FILE)"}),
    CommonFlag("--tls-ca", lambda: None,
               {"metavar": "PEM", "help": "CA bundle that signs the master's certificate: talk TLS "
                                          "(also KVPOOL_TLS_CA)"}),
    CommonFlag("--tls-cert", lambda: None,
               {"metavar": "PEM", "help": "client certificate for mutual TLS (also KVPOOL_TLS_CERT)"}),
    CommonFlag("--tls-key", lambda: None,
               {"metavar": "PEM", "help": "the client certificate's private key (also KVPOOL_TLS_KEY)"}),
]

_SERVER = "_kvpool_server_command"


def mark_server_command(p: argparse.ArgumentParser) -> None:
    """A subcommand that runs a server: it takes server settings, not the common client flags."""
    p.set_defaults(**{_SERVER: True})


def _subparsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out: list[argparse.ArgumentParser] = []
    for action in p._actions:  # argparse offers no public walk of its subcommand tree
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if all(child is not seen for seen in out):  # aliases share one parser
                    out.append(child)
    return out


def _add_common(p: argparse.ArgumentParser, *, top: bool) -> None:
    group = p.add_argument_group("common options" if top else
                                 "common options (also accepted before the subcommand)")
    for flag in COMMON_FLAGS:
        kwargs = dict(flag.kwargs)
        kwargs["default"] = flag.default() if top else argparse.SUPPRESS
        try:
            group.add_argument(flag.name, dest=flag.dest, **kwargs)
        except argparse.ArgumentError:
            # The subcommand defines this flag itself: it keeps its own flag, but a value given
            # before the subcommand must not be reset by that flag's default.
            own = p._option_string_actions.get(flag.name)
            if own is not None and own.dest == flag.dest:
                own.default = argparse.SUPPRESS


def install_common_flags(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every client subcommand below it the :data:`COMMON_FLAGS`.

    Call it once, after every subcommand is registered.
    """
    _add_common(parser, top=True)

    def walk(p: argparse.ArgumentParser) -> None:
        for child in _subparsers(p):
            if child.get_default(_SERVER):
                continue
            _add_common(child, top=False)
            walk(child)

    walk(parser)


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file of settings (also KVPOOL_CONFIG)")
    p.add_argument("--log-level", help="debug, info, warning (default info)")


def add_master_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("master")
    g.add_argument("--host", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    g.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464; 0 picks, -1 disables)")
    g.add_argument("--metrics-host", help="address of the Prometheus port, which has no authentication "
                   "(default: the --host address; e.g. 127.0.0.1 for a local scraper)")
    g.add_argument("--eviction-policy", help="eviction policy: lhd (default, learned hit density), paced or lru")
    g.add_argument("--high-watermark", type=float, help="start evicting/demoting above this fraction (default 0.95)")
    g.add_argument("--low-watermark", type=float, help="evict/demote down to this fraction (default 0.90)")
    g.add_argument("--lease-ttl", type=float, help="seconds a read lease lives (default 30)")
    g.add_argument("--grant-ttl", type=float, help="seconds a put grant lives (default 30)")
    g.add_argument("--max-batch", type=int, help="most keys in one RPC (default 65536)")
    g.add_argument("--write-through", choices=("true", "false"), help="also copy every committed block to NVMe")
    g.add_argument("--heartbeat-interval", type=float, help="seconds between node heartbeats (default 1)")
    g.add_argument("--events-port", type=int, help="publish KV events for routers on this ZMQ PUB port (vLLM's "
                   "format; 0 picks, default -1: off)")
    g.add_argument("--events-topic", help="ZMQ topic of the KV events (default empty)")
    g.add_argument("--events-host", help="address the KV-event socket binds (default 127.0.0.1; it carries every "
                   "tenant's events unauthenticated, so another address needs --insecure)")
    g.add_argument("--replicas", type=int, help="copies of each block on nodes of different hosts (default 1)")
    g.add_argument("--read-replicas", type=int, help="extra copies a block may gain on hosts that read it often "
                   "(default 0: none)")
    g.add_argument("--quotas", help="byte quotas per tenant and memory tier, e.g. 'alice:dram=8GiB,bob:dram=2GiB'")
    g.add_argument("--max-message-bytes", help="largest gRPC request accepted, e.g. 64MiB (default); larger "
                   "ones are refused before they are read")
    g = p.add_argument_group("security")
    g.add_argument("--auth-tokens", metavar="FILE", help="bearer tokens, one 'TOKEN ROLE [TENANT]' a line "
                   "(roles: client, admin, node); required to listen beyond loopback")
    g.add_argument("--insecure", action="store_const", const=True, help="listen beyond loopback without tokens "
                   "(only where every host on the network is trusted)")
    add_tls_flags(g, serving=True)


def add_redis_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shared metadata and standby masters")
    g.add_argument("--redis", help="Redis URL, e.g. redis://127.0.0.1:6379/0: keep metadata there and elect a "
                   "leader among the masters that share it (default: none, metadata in memory)")
    g.add_argument("--redis-prefix", help="prefix of this pool's Redis keys (default kvpool)")
    g.add_argument("--leader-ttl", type=float, help="seconds before a standby takes over from a silent leader "
                   "(default 3)")
    g.add_argument("--advertise-host", help="address standbys hand out for this master (default: --host)")
    g.add_argument("--redis-commit", choices=("sent", "wait", "background"), help="when a commit is answered: "
                   "once the Redis write that carries it is in the kernel's socket buffer (sent, the default: a "
                   "kill -9 of the master loses nothing answered), after Redis's reply (wait), or at once, written "
                   "in the background (a kill -9 of the leader can then lose the last commits it answered)")
    g.add_argument("--redis-backlog", type=int, metavar="N", help="changes not yet in Redis past which commits "
                   "wait for the writer (default 65536)")


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
