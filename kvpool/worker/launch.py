"""Start the processes of a deployment: ``kvpool serve`` and workers, each as a child.

Used by ``kvpool demo``, ``tools/bench_ttft.py`` and the tests. ``popen`` starts a process
(the multi-host tests pass a host's own ``popen`` to run it inside a network namespace).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

from kvpool.lifeline import child_env

__all__ = ["Child", "spawn_child", "stop_process", "start_child", "start_serve", "start_worker", "serve_argv", "worker_argv",
           "SERVE_READY", "WORKER_READY"]


class Child:
    """A child process and the match of its ready line; ``log()`` is what it printed."""

    def __init__(self, proc: subprocess.Popen, match: re.Match, lines: list[str]) -> None:
        self.proc = proc
        self.match = match
        self.lines = lines

    @property
    def address(self) -> str:
        return self.match.group(1)

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 20.0) -> None:
        stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (the processes here shut down cleanly on it), then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn_child(argv: list[str], ready: str, env: dict | None = None, popen=subprocess.Popen,
                cwd: str | None = None):
    """Start ``argv``; returns a function that waits (``timeout`` s) for its ready line and
    returns the :class:`Child`. Start several, then wait for each: they boot in parallel.

    ``cwd``: run there. ``python -m`` puts its directory first on ``sys.path``, so from a
    source checkout with kvpool installed as a wheel, run children elsewhere (the checkout's
    ``kvpool/`` lacks ``kvpool.kernels`` and ``kvpool.tiers``, which the install maps).

    The child ends with this process, even when it is killed (:mod:`kvpool.lifeline`)."""
    proc = popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                 env={**os.environ, **child_env(), **(env or {})}, cwd=cwd)
    lines: list[str] = []
    found: dict = {}
    done = threading.Event()

    def pump() -> None:  # keep reading so the child never blocks on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if "m" not in found and (m := re.search(ready, line)):
                found["m"] = m
                done.set()
        done.set()

    threading.Thread(target=pump, daemon=True).start()

    def wait(timeout: float = 120.0) -> Child:
        if not done.wait(timeout) or "m" not in found:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{' '.join(argv[1:5])} did not become ready:\n" + "".join(lines))
        return Child(proc, found["m"], lines)

    wait.proc = proc
    return wait


def start_child(argv: list[str], ready: str, env: dict | None = None, timeout: float = 120.0,
                popen=subprocess.Popen) -> Child:
    """Start ``argv`` and wait until a stderr line matches ``ready``."""
    return spawn_child(argv, ready, env, popen)(timeout)


def serve_argv(data_dir: str, dram: str = "256MiB", extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "kvpool", "serve", "--port", "0", "--metrics-port", "-1",
            "--dram", dram, "--prefault", "false", "--data-dir", data_dir, *extra]


SERVE_READY = r"ready grpc=(\S+)"
WORKER_READY = r"worker ready .*listen=(\S+)"


def worker_argv(role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "kvpool.worker", role, *args]


def start_serve(data_dir: str, dram: str = "256MiB", extra: tuple[str, ...] = (), **kw) -> Child:
    """An embedded pool (``kvpool serve``) on a free loopback port."""
    return start_child(serve_argv(data_dir, dram, extra), SERVE_READY, **kw)


def start_worker(role: str, *args: str, **kw) -> Child:
    """``python -m kvpool.worker ROLE ARGS`` on a free port."""
    return start_child(worker_argv(role, *args), WORKER_READY, **kw)
