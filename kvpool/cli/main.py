"""The ``kvpool`` command: ``serve``, ``master``, ``node``, ``admin``, ``demo``, ``replay``, ``completion``.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed args and returning an exit code.
The common client flags (``--address``, ``--json``, ``--timeout``) are added to every
subcommand afterwards by :func:`kvpool.cli.flags.install_common_flags`, so they work before
or after the subcommand without each module declaring them.
"""

from __future__ import annotations

import argparse
import os
import sys

from kvpool import __version__
from kvpool.cli import admin, completion, demo, master, node, serve
from kvpool.cli.flags import install_common_flags

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpool", description="A tiered KV-cache pool for LLM inference.")
    parser.add_argument("--version", action="version", version=f"kvpool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve.register(sub)
    master.register(sub)
    node.register(sub)
    admin.register(sub)
    demo.register(sub)
    try:
        from kvpool.cli import replay
    except ImportError:  # the replay tool is optional in a trimmed install
        replay = None
    if replay is not None:
        replay.register(sub)
    completion.register(sub)
    install_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`kvpool admin stats --json | head`): exit quietly, as Unix
        # tools do, with stdout pointed at /dev/null so the interpreter's final flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
