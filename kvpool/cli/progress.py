"""Progress for long CLI operations: on a terminal only, never in ``--json`` mode.

Progress goes to stderr (tqdm), so stdout stays the command's result and can be piped.
It is shown only when stderr is a terminal and ``--json`` is off: scripts and CI logs see
the result alone.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time

from tqdm import tqdm

__all__ = ["enabled", "bar", "busy"]


def enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "json", False) and sys.stderr.isatty()


def bar(args: argparse.Namespace, total: int, desc: str, unit: str = "block") -> tqdm:
    """A progress bar over ``total`` units (disabled off a terminal or under --json)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(args),
                dynamic_ncols=True, leave=True)


@contextlib.contextmanager
def busy(args: argparse.Namespace, desc: str, every: float = 0.2):
    """For one long call with no count to show: the elapsed time, refreshed while it runs."""
    if not enabled(args):
        yield
        return
    stop = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not stop.wait(every):
            sys.stderr.write(f"\r{desc} … {time.monotonic() - start:.1f}s")
            sys.stderr.flush()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        sys.stderr.write(f"\r{desc} … done in {time.monotonic() - start:.1f}s\n")
        sys.stderr.flush()
