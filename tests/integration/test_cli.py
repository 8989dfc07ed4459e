"""The `kvpool` command as people type it, against real processes.

The README's operating commands run exactly as written (placeholders filled in) against a
real master with two real nodes; progress appears on a terminal and never under --json;
bash completion completes from the same parser; a client and an admin command wait for a
master that is still starting; `kvpool serve` with its default settings is ready in < 2 s.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from kvpool import Client, errors
from tests.conftest import start_kvpool
from tests.integration.helpers import fresh_namespace, random_blocks
from tests.integration.pool_processes import cluster, registered  # noqa: F401  (the fixture)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    block = re.search(r"## Operating it\s+```sh\n(.*?)```", README.read_text(), re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def typed(command: str, env: dict, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command line as a shell would, with `kvpool` being this checkout's."""
    bindir = cwd / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "kvpool"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m kvpool \"$@\"\n")
    shim.chmod(0o755)
    env = {**env, "PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(cwd),
           "PYTHONPATH": str(README.parent)}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def test_readme_operating_commands_run_as_written(cluster, tmp_path):
    master, node = cluster
    _, address = master()
    node(address, "node-a")
    node(address, "node-b")
    assert registered(address, 2)
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(8)]
    with Client(address, ns) as c:
        c.put_blocks(keys, random_blocks(8))
        c.get_blocks(keys[:4])
    listing = json.loads(typed("kvpool admin ls --json", {"KVPOOL_ADDRESS": address}, tmp_path).stdout)
    full_node = listing["blocks"][0]["node_id"]
    nodes = json.loads(typed("kvpool admin nodes --json", {"KVPOOL_ADDRESS": address}, tmp_path).stdout)["nodes"]
    name = next(n["name"] for n in nodes if n["node_id"] == full_node)

    fill = {"KEYHEX": keys[0].hex(), "NODE": name, "ID": ns.id, "10.0.0.1:50051": address}
    expect = {  # what each command must show, by its first words
        "kvpool admin stats": ["hit rate", "node-a"],
        "kvpool admin stats --json": ['"hit_blocks"'],
        "kvpool admin stats --address": ["hit rate"],
        "kvpool admin nodes": ["node-a", "node-b"],
        "kvpool admin ls": [keys[1].hex(), "of 8 blocks"],
        "kvpool admin inspect": ["committed", ns.id],
        "kvpool admin top": ["hit rate", "blk/s", "node-b"],
        "kvpool admin drain NODE --resume": ["takes new blocks again"],
        "kvpool admin drain": ["moved 8 blocks", "0 left"],
        "kvpool admin evict": ["evicted 8 blocks"],
        "kvpool admin flush": ["removed 0 blocks"],
        "kvpool admin namespaces": [ns.id[:16], ns.model, "pool default: 1 copy"],
        "kvpool admin namespaces --namespace": ["now keeps 2 copies", ns.id[:16]],
        "kvpool completion": [],
    }
    commands = readme_commands()
    assert len(commands) == len(expect)
    for command in commands:
        line = command
        for placeholder, value in fill.items():
            line = line.replace(placeholder, value)
        # KVPOOL_ADDRESS stands for the README's "--address (or KVPOOL_ADDRESS)": a master elsewhere.
        r = typed(line, {"KVPOOL_ADDRESS": address}, tmp_path)
        assert r.returncode == 0, f"{line}: {r.stderr}"
        want = expect[max((k for k in expect if command.startswith(k)), key=len)]
        for text in want:
            assert text in r.stdout, f"{line}: {text!r} not in {r.stdout!r}"
        if "--json" in line:
            json.loads(r.stdout)
        assert r.stderr == "", f"{line}: {r.stderr}"  # no progress off a terminal
    script = tmp_path / ".kvpool-completion.bash"
    assert "_shtab_kvpool" in script.read_text()


def run_on_tty(argv: list[str], env: dict) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (as in an interactive shell), stdout a pipe."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "kvpool", *argv], stdout=subprocess.PIPE, stderr=follower,
                            text=True, env={**os.environ, **env})
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read()
    os.close(leader)
    return proc.wait(timeout=30), out, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_and_none_under_json(cluster):
    master, node = cluster
    _, address = master()
    node(address, "node-a")
    node(address, "node-b")
    assert registered(address, 2)
    ns = fresh_namespace()
    with Client(address, ns) as c:
        c.put_blocks([os.urandom(16) for _ in range(40)], random_blocks(40))
    listing = json.loads(subprocess.run([sys.executable, "-m", "kvpool", "admin", "ls", "--json", "--address", address],
                                        capture_output=True, text=True, timeout=60).stdout)
    source = str(listing["blocks"][0]["node_id"])

    rc, out, tty = run_on_tty(["admin", "drain", source, "--batch", "8", "--address", address], {})
    assert rc == 0 and "moved 40 blocks" in out
    assert re.search(r"draining node-\w+: +100%.*40/40", tty), repr((out, tty))  # tqdm's bar, on the terminal only
    assert "moved 40" not in tty

    rc, out, tty = run_on_tty(["admin", "evict", "--all", "--address", address], {})
    assert rc == 0 and "evicted 40 blocks" in out and "evicting … done in" in tty

    rc, out, tty = run_on_tty(["--json", "admin", "drain", source, "--resume", "--address", address], {})
    assert rc == 0 and json.loads(out)["draining"] is False and tty == ""
    rc, out, tty = run_on_tty(["admin", "flush", "--json", "--address", address], {})
    assert rc == 0 and json.loads(out) == {"deferred": 0, "removed": 0} and tty == ""


def test_bash_completion_completes_subcommands_and_common_flags(tmp_path):
    script = subprocess.run([sys.executable, "-m", "kvpool", "completion", "bash"], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    (tmp_path / "c.sh").write_text(script)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        code = (f"source {tmp_path / 'c.sh'}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
                f"COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; "
                f"_shtab_kvpool kvpool {words[-1]} {words[-2]}; echo \"${{COMPREPLY[@]}}\"")
        return subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30).stdout.split()

    assert complete("kvpool", "adm") == ["admin"]
    assert complete("kvpool", "admin", "dr") == ["drain"]
    assert complete("kvpool", "admin", "stats", "--js") == ["--json"]
    assert "--resume" in complete("kvpool", "admin", "drain", "x", "--")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_and_admin_wait_for_a_starting_master(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    results: dict = {}

    def use_pool() -> None:
        with Client(address, fresh_namespace(), startup_wait=30) as c:
            results["put"] = c.put_blocks([os.urandom(16)], random_blocks(1)).written

    def admin() -> None:
        results["admin"] = subprocess.run([sys.executable, "-m", "kvpool", "admin", "stats", "--json",
                                           "--address", address, "--timeout", "30"],
                                          capture_output=True, text=True, timeout=60)

    threads = [threading.Thread(target=use_pool), threading.Thread(target=admin)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # both are waiting now, on a port nothing listens on
    proc, _, _ = start_kvpool(["serve", "--port", str(port), "--metrics-port", "-1", "--data-dir",
                               str(tmp_path / "d")], r"ready grpc=")
    try:
        for t in threads:
            t.join(60)
        assert results["put"] == 1
        assert results["admin"].returncode == 0 and "hit_blocks" in results["admin"].stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_an_unreachable_master_fails_fast_naming_its_address():
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(errors.Unavailable, match=re.escape(address)):
        with Client(address, fresh_namespace(), startup_wait=0.5) as c:
            c.put_blocks([os.urandom(16)], random_blocks(1))
    assert time.monotonic() - start < 5
    r = subprocess.run([sys.executable, "-m", "kvpool", "admin", "stats", "--timeout", "1", "--address", address],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and address in r.stderr and "cannot reach" in r.stderr


def time_to_answer(tmp_path, *args: str) -> tuple[float, str]:
    """Seconds from starting `kvpool serve ARGS` to a client's first put answered, and its DRAM size."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kvpool", "serve", "--port", "0", "--metrics-port", "0", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        address = None
        for line in proc.stderr:
            m = re.search(r"ready grpc=(\S+) .*dram=(\S+)", line)
            if m:
                address, dram = m.group(1), m.group(2)
                break
        assert address is not None, "kvpool serve exited before it was ready"
        with Client(address, fresh_namespace(), startup_wait=0) as c:  # answers now, not later
            assert c.put_blocks([os.urandom(16)], random_blocks(1)).written == 1
        return time.monotonic() - start, dram
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_serve_with_default_settings_is_ready_within_two_seconds(tmp_path):
    """`make run` is `kvpool serve` with defaults (a 4 GiB DRAM tier, prefaulted): it must answer
    within 2 s, the prefault going on in the background. Only the ports are ephemeral, so the
    test can run beside another server. On a machine so loaded that even a server with nothing
    to prefault takes over a second (measured in the same run), the default may take that long
    plus one second, and no more (synchronous prefaulting took ~9 s). Each is timed twice,
    alternately, and the faster start counts: a burst of load from elsewhere on a shared
    machine then has to hit both starts of one kind to fail the test."""
    floors, times = [], []
    for run in range(2):
        (tmp_path / f"a{run}").mkdir()
        (tmp_path / f"b{run}").mkdir()
        floors.append(time_to_answer(tmp_path / f"a{run}", "--dram", "64MiB", "--prefault", "false")[0])
        elapsed, dram = time_to_answer(tmp_path / f"b{run}")
        assert dram == "4.0GiB"
        times.append(elapsed)
    floor, elapsed = min(floors), min(times)
    assert elapsed < max(2.0, floor + 1.0), f"kvpool serve took {elapsed:.2f}s to answer ({floor:.2f}s with no prefault)"
