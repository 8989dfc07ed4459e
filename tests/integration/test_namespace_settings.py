"""A namespace's settings survive a failover: they live in Redis with the namespace.

Two masters with Redis on host c, node A on host a, node B on host b (network-namespace
hosts, tests/hosts.py). An operator sets a namespace's replicas to 2 with the admin CLI, as
the README shows; the leader is killed with ``kill -9`` as soon as that is answered; the
standby takes over, says the namespace has replicas 2, copies the blocks there before, and
copies the blocks published after the takeover to both hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from tests.conftest import unavailable
from tests.hosts import hosts  # noqa: F401  (the fixture)
from tests.integration.test_multihost import HEARTBEAT, run_client
from tests.integration.test_replicas import admin, wait_used

REDIS_PORT = 6379  # inside host c: its own network namespace, nothing else listens there


def start_redis(host) -> str:
    """A real redis-server on ``host`` (no persistence; not protected mode, which refuses
    every address but loopback); returns its URL."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    host.popen(["redis-server", "--bind", host.address, "--port", str(REDIS_PORT), "--save", "", "--appendonly",
                "no", "--protected-mode", "no", "--dir", "/tmp"], stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    ping = f"import redis; print(redis.Redis(host={host.address!r}, port={REDIS_PORT}, socket_timeout=1).ping())"
    while host.run([sys.executable, "-c", ping], capture_output=True, text=True, timeout=10).stdout.strip() != "True":
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    return f"redis://{host.address}:{REDIS_PORT}/0"


def start_masters_with_redis(hosts, *node_args: str):
    """Redis and two masters (the first leads) on host c, nodes A and B on hosts a and b."""
    h = hosts(["a", "b", "c"])
    a, b, c = h["a"], h["b"], h["c"]
    url = start_redis(c)
    started = {}
    for name, ready in (("leader", r"ready grpc=(\S+)"), ("standby", r"standby grpc=(\S+)")):
        started[name] = c.start_kvpool(["master", "--host", c.address, "--insecure", "--port", "0", "--metrics-port",
                                        "-1", "--heartbeat-interval", HEARTBEAT, "--redis", url], ready)
    masters = f"{started['leader'][1].group(1)},{started['standby'][1].group(1)}"
    nodes = {}
    for host, name in ((a, "node-a"), (b, "node-b")):
        nodes[name], _, _ = host.start_kvpool(
            ["node", "--master", masters, "--host", host.address, "--insecure", "--port", "0", "--node-name", name,
             "--prefault", "false", "--data-dir", f"/tmp/kvpool-test-{os.getpid()}-{name}", *node_args],
            r"ready control=\S+ data=(\S+)")
    deadline = time.monotonic() + 20
    while run_client(a, "stats", masters)["nodes"] != 2:
        assert time.monotonic() < deadline, "nodes did not register"
        time.sleep(0.2)
    return (a, b, c), masters, started, nodes, url


def wait_taken_over(standby_lines, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any("took over with fencing epoch" in line for line in standby_lines):
        assert time.monotonic() < deadline, "the standby did not take over"
        time.sleep(0.1)


def test_replicas_set_with_the_cli_survive_kill_9_of_the_leader(hosts):
    (a, b, c), masters, started, _, _ = start_masters_with_redis(hosts)
    assert run_client(a, "publish", masters, 1, 3)["written"] == 3                    # pool default: 1 copy
    ns_id = admin(c, masters, "namespaces")["namespaces"][0]["namespace_id"]
    out = admin(c, masters, "namespaces", "--namespace", ns_id, "--set-replicas", "2")
    assert [n["replicas"] for n in out["namespaces"]] == [2]
    leader = started["leader"][0]
    leader.kill()                         # SIGKILL as soon as the setting is answered: it is in Redis
    leader.wait(timeout=10)
    wait_taken_over(started["standby"][2])
    listed = admin(c, masters, "namespaces")["namespaces"]
    assert [(n["namespace_id"], n["replicas"], n["replicas_default"]) for n in listed] == [(ns_id, 2, False)]
    wait_used(c, masters, {"node-a": 3, "node-b": 3})              # the blocks there before get their copies
    # The writer's client registers again stating no setting: the stored one stays.
    assert run_client(a, "publish", masters, 2, 4)["written"] == 4
    wait_used(c, masters, {"node-a": 7, "node-b": 7})                                 # new puts: 2 hosts
    got = run_client(b, "fetch", masters, 2, 4)
    assert got["hit"] == 4 and got["ok"] and set(got["kinds"].values()) == {"shm"}, got
