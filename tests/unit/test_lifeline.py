"""kvpool.lifeline: a child started by kvpool's launcher ends when its parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

PARENT = textwrap.dedent("""
    import sys, tempfile
    from kvpool.worker.launch import SERVE_READY, serve_argv, spawn_child
    tmp = tempfile.mkdtemp(prefix="kvpool-lifeline-")
    child = spawn_child(serve_argv(tmp, "16MiB"), SERVE_READY, cwd=tmp)(60)
    print(child.proc.pid, flush=True)
    sys.stdin.read()  # wait to be killed
""")


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (exited, not yet reaped by init) counts as gone.
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_served_child_stops_when_its_launcher_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid, 0.5), "the child should be serving while its parent lives"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _gone(child_pid, 20), "kvpool serve outlived the launcher that was killed"
    finally:
        parent.kill()
        parent.wait()

