"""The multi-host harness (tests/hosts.py), checked with real processes and namespaces."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.hosts import Network, hosts  # noqa: F401 - hosts is the fixture

PORT = 7000

# An echo server: one thread per connection, echoes until the peer closes.
ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("listening", flush=True)
def echo(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
while True:
    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
"""

# Connect, send, print what comes back; exit 1 (saying why) if that fails within the timeout.
ECHO_CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    c.sendall(b"hello")
    print(c.recv(64).decode())
except OSError as e:
    print(type(e).__name__, e)
    sys.exit(1)
"""

IDENTITY = ("import socket; print(socket.gethostname());"
            "print(open('/proc/sys/kernel/random/boot_id').read().strip())")


def start_echo(host, address: str | None = None) -> subprocess.Popen:
    proc = host.popen([sys.executable, "-c", ECHO_SERVER, address or host.address, str(PORT)],
                      stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc


def echo_from(host, address: str, timeout: float = 1.0) -> subprocess.CompletedProcess:
    return host.run([sys.executable, "-c", ECHO_CLIENT, address, str(PORT), str(timeout)],
                    capture_output=True, text=True, timeout=timeout + 10)


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_hosts_talk_over_the_bridge_with_their_own_hostnames(hosts):
    h = hosts(["a", "b"])
    a, b = h["a"], h["b"]
    assert (a.name, b.name) == ("host-a", "host-b") and a.address != b.address
    start_echo(a)
    res = echo_from(b, a.address)
    assert (res.returncode, res.stdout.strip()) == (0, "hello"), res.stdout + res.stderr

    # Each host has its own hostname, the machine's boot id (what kvpool's host_id() reads).
    root_boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    for host in (a, b):
        out = host.run([sys.executable, "-c", IDENTITY], capture_output=True, text=True,
                       check=True, timeout=10).stdout.split()
        assert out == [host.name, root_boot]
    assert socket.gethostname() not in (a.name, b.name)

    # Loopback is up inside a host, and it is the host's own.
    for host in (a, b):  # a's server is bound to eth0's address, b has none
        res = echo_from(host, "127.0.0.1")
        assert res.returncode == 1 and "ConnectionRefused" in res.stdout, res.stdout
    start_echo(a, "127.0.0.1")
    assert echo_from(a, "127.0.0.1").stdout.strip() == "hello"


def test_nothing_in_the_root_namespace_reaches_a_host(hosts):
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    a = hosts(["a", "b"])["a"]
    start_echo(a)
    root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert a.address not in root
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert [ln.split(":")[1] for ln in links_after.splitlines()] == \
        [ln.split(":")[1] for ln in links_before.splitlines()]
    # The connection fails, or reaches something else (a sandbox's gateway may accept any
    # TCP connection), but never a's echo server.
    t0 = time.monotonic()
    try:
        with socket.create_connection((a.address, PORT), timeout=1) as c:
            c.sendall(b"hello")
            reply = c.recv(64)
    except OSError as e:  # unreachable, refused or timed out
        reply = e
    assert reply != b"hello"
    assert time.monotonic() - t0 < 3


def test_cut_drops_packets_and_heal_restores_them(hosts):
    h = hosts(["a", "b", "m"])
    a, b, m = h["a"], h["b"], h["m"]
    net = a.network
    start_echo(a)
    # A connection made before the cut stalls during it and carries on after the heal.
    persistent = b.popen([sys.executable, "-c", r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b"one"); print(c.recv(64).decode(), flush=True)
sys.stdin.readline()
c.sendall(b"two"); c.settimeout(0.5)
try:
    print(c.recv(64).decode(), flush=True)
except TimeoutError:
    print("stalled", flush=True)
sys.stdin.readline()
c.settimeout(10); print(c.recv(64).decode(), flush=True)
""", a.address, str(PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert persistent.stdout.readline().strip() == "one"

    net.cut("a")
    persistent.stdin.write("cut\n")
    persistent.stdin.flush()
    assert persistent.stdout.readline().strip() == "stalled"
    res = echo_from(b, a.address, timeout=0.5)
    assert res.returncode == 1 and "TimeoutError" in res.stdout, res.stdout
    res = echo_from(m, b.address, timeout=0.5)  # the others still talk: m to b's (no) server
    assert res.returncode == 1 and "ConnectionRefused" in res.stdout, res.stdout

    t0 = time.monotonic()
    net.heal("a")
    healed_in = time.monotonic() - t0
    res = echo_from(b, a.address)
    assert (res.returncode, res.stdout.strip()) == (0, "hello"), res.stdout
    persistent.stdin.write("healed\n")
    persistent.stdin.flush()
    assert persistent.stdout.readline().strip() == "two"  # TCP retransmitted it
    assert persistent.wait(timeout=10) == 0
    assert healed_in < 2


def test_close_kills_every_process_and_deletes_the_namespaces():
    with pytest.raises(ZeroDivisionError):  # a failing test: the with block still closes
        with Network(["a", "b"]) as net:
            a = net.hosts["a"]
            names = [h.netns for h in net.hosts.values()] + [net.bridge_netns]
            assert all(n in netns_list() for n in names)
            tracked = a.popen(["sleep", "60"])
            untracked = subprocess.Popen(a.command(["sleep", "60"]))  # not popen: not tracked
            parent = a.popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                             text=True)
            orphan = int(parent.stdout.readline())  # sleeps on after sh gets SIGTERM
            1 / 0
    assert tracked.poll() is not None and parent.poll() is not None
    assert untracked.wait(timeout=5) is not None
    try:
        with open(f"/proc/{orphan}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # dead, not yet reaped by init
    except FileNotFoundError:
        pass
    listed = netns_list()
    assert not [n for n in names if n in listed]
    net.close()  # idempotent
    with pytest.raises(RuntimeError):
        a.popen(["true"])


def test_the_fixture_closes_its_networks_after_the_test(request):
    made = {}

    def check() -> None:  # registered first, so it runs after the fixture's teardown
        listed = netns_list()
        assert made and not [n for n in made["netns"] if n in listed]
        assert made["proc"].poll() is not None

    request.addfinalizer(check)
    h = request.getfixturevalue("hosts")(["a"])
    made["netns"] = [h["a"].netns, h["a"].network.bridge_netns]
    made["proc"] = h["a"].popen(["sleep", "60"])


def test_start_kvpool_runs_in_the_host(hosts):
    a = hosts(["a"])["a"]
    proc, m, lines = a.start_kvpool(["serve", "--host", a.address, "--insecure", "--port", "0", "--metrics-port", "-1",
                                     "--prefault", "false"], r"ready grpc=(\S+) .*data=(\S+)", timeout=60)
    assert m.group(1).startswith(a.address + ":") and m.group(2).startswith(a.address + ":")
    assert proc in a._procs
    with pytest.raises(RuntimeError, match=r"(?s)exited with 2.*unrecognized"):
        a.start_kvpool(["serve", "--no-such-flag"], r"never printed", timeout=30)



def test_bad_names():
    for names in ([], ["a", "a"], ["A"], ["a b"]):
        with pytest.raises(ValueError):
            Network(names)
