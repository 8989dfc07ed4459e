"""Shared test helpers: start real `kvpool serve` processes on ephemeral loopback ports."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

# tests/engines/ imports vLLM and SGLang: it runs in their own environment (.venv-engines,
# which `make test` builds), never in the main venv, which has neither.
if importlib.util.find_spec("vllm") is None:
    collect_ignore = ["engines"]

# Triton decides once, at its first import, whether to compile or interpret. Without CUDA
# the kernels can only run interpreted, so say so before any test module imports triton.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@dataclass
class ServeProcess:
    """A running `kvpool serve` child process and what its ready line said."""

    proc: subprocess.Popen
    address: str
    metrics_url: str
    shm_path: str
    lines: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return "".join(self.lines)


def start_kvpool(args: list[str], ready: str, env: dict | None = None, timeout: float = 60.0,
                 popen=subprocess.Popen):
    """Start ``python -m kvpool ARGS`` and wait for a log line matching ``ready``.

    ``popen`` starts it (tests/hosts.py passes ``Host.popen`` to run it inside a host).

    Returns (process, the ready line's match, the list of log lines so far and to come).
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    # Tests default to a small DRAM tier through the environment, the lowest precedence,
    # so that flags and TOML files under test still win.
    full_env["KVPOOL_DRAM"] = "64MiB"
    full_env.update(env or {})
    proc = popen([sys.executable, "-m", "kvpool", *args], stderr=subprocess.PIPE,
                 stdout=subprocess.DEVNULL, text=True, env=full_env)
    lines: list[str] = []
    found: dict[str, re.Match] = {}
    done = threading.Event()

    def pump() -> None:  # keep reading so the child never blocks on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if "m" not in found:
                m = re.search(ready, line)
                if m:
                    found["m"] = m
                    done.set()
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    if not done.wait(timeout):
        proc.kill()
        raise RuntimeError(f"kvpool {args[0]} did not become ready:\n" + "".join(lines))
    if "m" not in found:
        proc.wait(timeout=10)
        raise RuntimeError(f"kvpool {args[0]} exited with {proc.returncode}:\n" + "".join(lines))
    return proc, found["m"], lines


def start_serve(tmp_path, *args: str, env: dict | None = None, timeout: float = 60.0) -> ServeProcess:
    """Start `python -m kvpool serve` on port 0 and wait for its ready line."""
    proc, m, lines = start_kvpool(
        ["serve", "--port", "0", "--metrics-port", "0", "--data-dir", str(tmp_path / "data"), *args],
        r"ready grpc=(\S+) metrics=(\S+) .*shm=(\S+)", env, timeout)
    return ServeProcess(proc, m.group(1), m.group(2), m.group(3), lines)


def unavailable(reason: str) -> None:
    """A test needs something this machine lacks (a tool, a permission): it fails, saying how
    to get it. `make test` installs and permits everything the suite needs (as root), so a
    skip here would only hide a machine that cannot check what the test checks."""
    pytest.fail(f"{reason}; run the suite with `make test` (it installs the system packages, as root)")


@pytest.fixture
def mount_point(tmp_path):
    """Mount a small filesystem of a given type at a fresh directory; unmount after the test."""
    mounted = []

    def mount(fstype: str, options: str = "") -> str:
        path = tmp_path / f"mnt-{fstype}-{len(mounted)}"
        path.mkdir()
        cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [fstype, str(path)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            unavailable(f"cannot run mount: {e}")
        if res.returncode != 0:
            unavailable(f"mount -t {fstype} is not permitted here: {res.stderr.strip()}")
        mounted.append(str(path))
        return str(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", path], capture_output=True)


@pytest.fixture
def serve_factory(tmp_path):
    """Start servers with custom flags; all are stopped at the end of the test."""
    started: list[ServeProcess] = []

    def factory(*args: str, env: dict | None = None) -> ServeProcess:
        sp = start_serve(tmp_path, *args, env=env)
        started.append(sp)
        return sp

    yield factory
    for sp in started:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()
        if os.path.exists(sp.shm_path):
            os.unlink(sp.shm_path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One shared server (64 MiB DRAM) for a test module."""
    sp = start_serve(tmp_path_factory.mktemp("serve"))
    yield sp
    sp.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    """Remove the DRAM segments of nodes that tests killed with SIGKILL.

    A node unlinks its segment on any orderly exit (tiers/dram.py); a kill -9, which the
    failover tests do on purpose, leaves it in /dev/shm. Only segments created during this
    session by a process that is gone are removed, so a developer's running pool is untouched.
    """
    shm = "/dev/shm"
    try:
        names = os.listdir(shm)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(r"kvpool-(\d+)-[0-9a-f]+", name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(shm, name)
        try:
            if os.stat(path).st_mtime >= _SESSION_START - 1:
                os.unlink(path)
        except OSError:
            pass
