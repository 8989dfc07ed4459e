"""Start ``kvpool master`` and ``kvpool node`` processes with any flags; kill all at the end."""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests.conftest import start_kvpool

HEARTBEAT = "0.2"


class Proc:
    def __init__(self, proc, lines, address: str = "") -> None:
        self.proc, self.lines, self.address = proc, lines, address

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(timeout=20)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 15.0) -> re.Match | None:
        from tests.integration.helpers import wait_for

        found = {}

        def seen() -> bool:
            m = re.search(pattern, self.log())
            if m:
                found["m"] = m
            return bool(m)

        wait_for(seen, timeout=timeout)
        return found.get("m")


@pytest.fixture
def pool_procs(tmp_path):
    """``master(*flags, ready=...)`` and ``node(master_address, name, *flags)`` factories."""
    started: list[Proc] = []
    shm: list[str] = []

    def master(*flags: str, port: int = 0, ready: str = r"(?:ready|standby) grpc=(\S+)") -> Proc:
        proc, m, lines = start_kvpool(["master", "--port", str(port), "--metrics-port", "-1",
                                       "--heartbeat-interval", HEARTBEAT, *flags], ready)
        started.append(Proc(proc, lines, m.group(1)))
        return started[-1]

    def node(master_address: str, name: str = "node-a", *flags: str) -> Proc:
        proc, m, lines = start_kvpool(["node", "--master", master_address, "--port", "0", "--node-name", name,
                                       "--data-dir", str(tmp_path / name), *flags],
                                      r"ready control=(\S+) .*shm=(\S+)")
        started.append(Proc(proc, lines, m.group(1)))
        shm.append(m.group(2))
        return started[-1]

    yield master, node
    for p in started:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGCONT)
        p.kill()
    for path in shm:
        if os.path.exists(path):
            os.unlink(path)
