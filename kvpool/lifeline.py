"""Children that end with the process that started them.

``kvpool demo``, ``tools/bench_ttft.py`` and the tests start ``kvpool serve`` and workers as
child processes (:mod:`kvpool.worker.launch`). When that parent is killed with SIGKILL it
cannot stop them, and they would serve on forever. So the launcher puts its pid in
``KVPOOL_PARENT_PID``, and a child that finds it asks the kernel (``PR_SET_PDEATHSIG``) for a
SIGTERM when its parent goes: the child then shuts down as on any SIGTERM, cleanly.

A pool started by an operator or a supervisor (systemd, Kubernetes) has no such variable and
is not affected.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["ENV", "follow_parent", "child_env"]

ENV = "KVPOOL_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env() -> dict[str, str]:
    """What a launcher adds to a child's environment so that the child follows it."""
    return {ENV: str(os.getpid())}


def follow_parent() -> None:
    """Called first thing in a child: end with the parent named in ``KVPOOL_PARENT_PID``."""
    parent = os.environ.pop(ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    # The parent may have died before prctl took effect; then we were re-parented already.
    if os.getppid() == 1 or not _alive(int(parent)):
        os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True
