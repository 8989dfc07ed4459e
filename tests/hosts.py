"""Hosts for multi-host tests, on one machine (needs root, as CI has).

A host is a Linux network namespace whose processes also get their own UTS namespace, with
the host's name as hostname: kvpool processes on different hosts see different
``socket.gethostname()`` (so different ``host_id()``) and never try shared memory with each
other, only the network. The hosts of a ``Network`` are cabled to one bridge that lives in a
namespace of its own; each has an address ``10.213.<k>.<i>/24`` on its ``eth0`` and loopback
up. Nothing is configured in the root namespace: no address, no route, no interface, so a test
process outside the hosts cannot reach them (talk to a host by running a command inside it).

    from tests.hosts import hosts          # the fixture (tests/conftest.py does not export it)

    def test_two_hosts(hosts):
        h = hosts(["a", "b"])              # {"a": Host, "b": Host}, torn down after the test
        h["a"].name, h["a"].address        # "host-a", "10.213.3.1"
        master, m, log = h["a"].start_kvpool(
            ["master", "--host", h["a"].address, "--port", "50051", "--insecure"], r"master ready grpc=(\\S+)")
        h["b"].run([sys.executable, "-c", "..."], check=True, timeout=10)
        net = h["a"].network
        net.cut("a"); ...; net.heal("a")   # pull / plug host a's cable at the bridge

API:

``Network(names)``  a context manager: creates one host per name (names are ``[a-z0-9-]``).
    ``hosts``       dict name -> Host.
    ``cut(name)``   takes the bridge's port to that host down: packets to and from it are
                    silently dropped (connects time out, established TCP connections stall);
                    the host keeps its address, its sockets and its processes.
    ``heal(name)``  brings the port back up and returns once both ends carry traffic.
    ``close()``     kills every process in the hosts (SIGTERM, then SIGKILL after ``grace``
                    seconds), then deletes every namespace. Idempotent; also run at exit.
``Host``            ``name`` (``"host-<name>"``, also its hostname), ``netns``, ``address``,
                    ``network`` (its Network).
    ``command(argv)``   argv wrapped to run inside the host.
    ``popen(argv, **kw)`` / ``run(argv, **kw)``  subprocess.Popen / subprocess.run of that;
                    popen'ed processes are tracked and killed at close.
    ``start_kvpool(args, ready, env=None, timeout=60)``  like tests/conftest.py's
                    ``start_kvpool``: ``python -m kvpool ARGS`` inside the host, KVPOOL_*
                    dropped from the environment, KVPOOL_DRAM=64MiB by default, stderr read
                    in a thread until a line matches ``ready``; returns (proc, match, lines).
``hosts``           the pytest fixture: a factory ``hosts(names) -> dict name -> Host``; every
                    Network it made is closed after the test, failed or not.

How a command runs in a host::

    ip netns exec NETNS unshare --uts -- sh -c 'hostname "$0" && exec "$@"' HOSTNAME ARGV...

Every program in that chain execs the next, so the Popen's pid is ARGV's own process and
signals sent to it reach the program. Each command gets a fresh UTS namespace carrying the
host's hostname (equivalent, for gethostname, to one shared per host) and, from ``ip netns
exec``, a mount namespace of its own in which /sys is remounted to show the host's network
devices. Everything else is the machine's: the same pid namespace, filesystem, /dev/shm and
boot id (/proc/sys/kernel/random/boot_id), so shared-memory names must still be unique
across hosts, and a process started with ``command()`` but not ``popen()`` is still killed
at close (close kills whatever ``ip netns pids`` finds in each host).

Namespace names are ``kvpool-<pid>-<random>-<n>-br`` (the bridge) and
``kvpool-<pid>-<random>-<n>-h-<name>``: unique per process and per network, so parallel runs
and leftovers of a killed run never collide. ``ip netns list | grep kvpool-`` shows leftovers;
``ip netns del`` removes them.

When ``ip netns``, veth/bridge devices or ``unshare --uts`` are not permitted, the test fails
through ``tests.conftest.unavailable`` with how to run it.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field

import pytest

from tests.conftest import unavailable

__all__ = ["Host", "Network", "hosts"]

_PREFIX = f"kvpool-{os.getpid()}-{secrets.token_hex(2)}"
_counter = itertools.count()
_open: weakref.WeakSet[Network] = weakref.WeakSet()
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,40}\Z")
_IN_HOST = 'hostname "$0" && exec "$@"'
_LINK_TIMEOUT = 10.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        unavailable("the `ip` command (iproute2) is missing")
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@dataclass
class Host:
    """One host of a Network: a network namespace, a hostname, an address."""

    name: str
    netns: str
    address: str
    network: Network = field(repr=False, compare=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False, compare=False)

    def command(self, argv: list[str]) -> list[str]:
        """argv wrapped so that it runs inside this host (its netns, its hostname)."""
        argv = [str(a) for a in argv]
        if not argv:
            raise ValueError("empty argv")
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--",
                "sh", "-c", _IN_HOST, self.name, *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen of argv inside this host; killed when the network is closed."""
        if self.network.closed:
            raise RuntimeError(f"{self.name}: its network is closed")
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run of argv inside this host (pass timeout=: a hung host hangs the test)."""
        return subprocess.run(self.command(argv), **kwargs)

    def start_kvpool(self, args: list[str], ready: str, env: dict | None = None,
                     timeout: float = 60.0):
        """Start ``python -m kvpool ARGS`` in this host and wait for a stderr line matching
        ``ready``, as tests/conftest.py's start_kvpool does (same environment handling).

        Returns (process, the ready line's match, the list of log lines so far and to come).
        """
        from tests.conftest import start_kvpool

        return start_kvpool(args, ready, env, timeout, popen=self.popen)


class Network:
    """Hosts on one bridge; a context manager that closes them on exit. See the module doc."""

    def __init__(self, names: list[str], grace: float = 5.0) -> None:
        names = list(names)
        if not names or len(set(names)) != len(names) or len(names) > 250:
            raise ValueError(f"need 1 to 250 distinct host names, got {names}")
        for n in names:
            if not _NAME.match(n):
                raise ValueError(f"host name {n!r} is not [a-z0-9-], 1 to 41 characters")
        k = next(_counter)
        self.grace = grace
        self.closed = False
        self.bridge_netns = f"{_PREFIX}-{k}-br"
        self.hosts: dict[str, Host] = {}
        self._ports: dict[str, str] = {}  # name -> the bridge's veth to that host
        self._netns: list[str] = []  # created, in order
        _open.add(self)
        try:
            self._create(names, k)
        except BaseException:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - the first error is the one to see
                pass
            raise

    def _add_netns(self, netns: str) -> None:
        res = _ip("netns", "add", netns, check=False)
        if res.returncode != 0:
            unavailable(f"`ip netns add` is not permitted here: {res.stderr.strip()}")
        self._netns.append(netns)

    def _create(self, names: list[str], k: int) -> None:
        br = self.bridge_netns
        self._add_netns(br)
        res = _ip("-n", br, "link", "add", "br0", "type", "bridge", "stp_state", "0",
                  "forward_delay", "0", check=False)
        if res.returncode != 0:
            unavailable(f"cannot create a bridge device: {res.stderr.strip()}")
        _ip("-n", br, "link", "set", "br0", "up")
        for i, n in enumerate(names):
            netns = f"{_PREFIX}-{k}-h-{n}"
            self._add_netns(netns)
            port = f"p{i}"
            res = _ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                      "netns", netns, check=False)
            if res.returncode != 0:
                unavailable(f"cannot create a veth pair: {res.stderr.strip()}")
            _ip("-n", br, "link", "set", port, "master", "br0", "up")
            address = f"10.213.{k % 256}.{i + 1}"
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "link", "set", "eth0", "up")
            self.hosts[n] = Host(f"host-{n}", netns, address, self)
            self._ports[n] = port
        self._wait_up(names)
        # One probe: the UTS half of Host.command is permitted and sets the hostname.
        first = self.hosts[names[0]]
        try:
            res = first.run(["cat", "/proc/sys/kernel/hostname"], capture_output=True, text=True,
                            timeout=30)
        except FileNotFoundError as e:
            unavailable(f"cannot run a command in a host: {e}")
        if res.returncode != 0 or res.stdout.strip() != first.name:
            unavailable(f"cannot run a command in a host with its own hostname "
                        f"(ip netns exec + unshare --uts): {res.stderr.strip() or res.stdout!r}")

    def _operstates(self, netns: str) -> dict[str, str]:
        res = _ip("-j", "-n", netns, "link", "show")
        return {d["ifname"]: d.get("operstate", "") for d in json.loads(res.stdout or "[]")}

    def _wait_up(self, names: list[str]) -> None:
        """Return once both ends of each host's veth are UP (carrier, qdisc and bridge port
        forwarding: without STP a port forwards as soon as it is up)."""
        deadline = time.monotonic() + _LINK_TIMEOUT
        while True:
            ports = self._operstates(self.bridge_netns)
            pending = [n for n in names if ports.get(self._ports[n]) != "UP"
                       or self._operstates(self.hosts[n].netns).get("eth0") != "UP"]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"links of {pending} not up after {_LINK_TIMEOUT} s")
            time.sleep(0.01)

    def _host(self, name: str) -> str:
        if self.closed:
            raise RuntimeError("network is closed")
        if name not in self.hosts:
            raise KeyError(f"no host {name!r}; hosts are {sorted(self.hosts)}")
        return self._ports[name]

    def cut(self, name: str) -> None:
        """Pull host ``name``'s cable: its bridge port goes down, packets are dropped."""
        _ip("-n", self.bridge_netns, "link", "set", self._host(name), "down")

    def heal(self, name: str) -> None:
        """Plug it back; returns once the link carries traffic again. Neighbour (ARP) entries
        are flushed on every host so that none waits out a failed resolution."""
        _ip("-n", self.bridge_netns, "link", "set", self._host(name), "up")
        self._wait_up([name])
        for h in self.hosts.values():
            _ip("-n", h.netns, "neigh", "flush", "dev", "eth0", check=False)

    def close(self) -> None:
        """Kill every process in the hosts, then delete every namespace. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _open.discard(self)
        errors = []
        procs = [p for h in self.hosts.values() for p in h._procs]
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + self.grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Whatever else runs in a host (started with command(), or a child of a tracked one).
        hosts_netns = [h.netns for h in self.hosts.values()] + [self.bridge_netns]
        for _ in range(50):
            pids = set()
            for netns in hosts_netns:
                if netns in self._netns:
                    res = _ip("netns", "pids", netns, check=False)
                    pids.update(int(x) for x in res.stdout.split() if x.isdigit())
            pids.discard(os.getpid())
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)
        else:
            errors.append(f"processes still running in the hosts: {sorted(pids)}")
        for netns in reversed(self._netns):
            res = _ip("netns", "del", netns, check=False)
            if res.returncode != 0:
                errors.append(f"ip netns del {netns}: {res.stderr.strip()}")
        self._netns.clear()
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for net in list(_open):
        try:
            net.close()
        except Exception as e:  # noqa: BLE001 - at exit, report and go on with the others
            print(f"tests.hosts: {e}", file=sys.stderr)


@pytest.fixture
def hosts():
    """Factory ``hosts(names) -> dict name -> Host``; all its networks are closed after the test."""
    networks: list[Network] = []

    def make(names: list[str]) -> dict[str, Host]:
        net = Network(names)
        networks.append(net)
        return net.hosts

    yield make
    errors = []
    for net in reversed(networks):
        try:
            net.close()
        except Exception as e:  # noqa: BLE001 - close the others, then report
            errors.append(str(e))
    if errors:
        raise RuntimeError("; ".join(errors))
