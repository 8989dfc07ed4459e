"""KV events for routers (``kvpool master --events-port``), read by a real subscriber process.

The master publishes vLLM-style KV event batches over ZMQ PUB (msgpack): ``BlockStored``
when blocks are committed, ``BlockRemoved`` when they go, ``AllBlocksCleared`` when a master
starts; with Redis, the same batches go to the ``PREFIX:events`` stream. The ZMQ socket is for
trusted routers (loopback unless --insecure); ``Admin/SubscribeEvents`` streams a client
token's own tenant's events only.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import grpc
import msgpack
import pytest

from kvpool import Client
from kvpool.auth import bearer_metadata
from kvpool.rpc.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import start_kvpool, start_serve
from tests.integration.helpers import fresh_namespace, random_blocks, wait_for
from tests.integration.pool_procs import pool_procs  # noqa: F401  (fixture)
from tests.integration.redis_server import free_port, redis_server  # noqa: F401  (fixture)
from tests.integration.test_redis_metadata import stats

SUBSCRIBER = os.path.join(os.path.dirname(__file__), "kv_event_subscriber.py")


def test_a_subscriber_sees_blocks_stored_and_removed(pool_procs, redis_server):
    master, node = pool_procs
    port = free_port()
    m = master("--redis", redis_server.url, "--events-port", str(port), "--events-topic", "kvpool",
               ready=r"ready grpc=(\S+)")
    node(m.address, "node-a")
    assert wait_for(lambda: stats(m.address).nodes == 1, timeout=15)
    sub = subprocess.Popen([sys.executable, SUBSCRIBER, f"tcp://127.0.0.1:{port}", "30", "BlockRemoved"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.stdout.readline().strip() == "subscribed"
        ns = fresh_namespace()
        toks = list(range(16 * 3))
        with Client(m.address, ns) as c:
            c.publish(toks, random_blocks(3, seed=1))
            keys = ns.keys(toks)
            assert c.remove(keys[2:]) == 1
        out, err = sub.communicate(timeout=40)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 0, err
    batches = json.loads(out.strip().splitlines()[-1])
    events = [ev for b in batches for ev in b["events"]]
    assert all(b["topic"] == "kvpool" for b in batches)
    seqs = [b["seq"] for b in batches]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    stored = [ev for ev in events if ev[0] == "BlockStored"]
    removed = [ev for ev in events if ev[0] == "BlockRemoved"]
    assert stored == [["BlockStored", [k.hex() for k in keys], None, [], 16, None, "CPU"]]
    assert removed == [["BlockRemoved", [keys[2].hex()], "CPU"]]
    # The same batches, in Redis, for consumers that catch up later.
    entries = redis_server.client().xrange("kvpool:events")
    kinds = [ev[0] for _, fields in entries for ev in msgpack.unpackb(fields[b"batch"], raw=False)[1]]
    assert kinds[0] == "AllBlocksCleared" and "BlockStored" in kinds and kinds[-1] == "BlockRemoved"


TOKENS = {name: secrets.token_hex(16) for name in ("alice", "bob", "admin", "node")}


@pytest.fixture(scope="module")
def tenants_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("events-auth")
    (d / "tokens").write_text(f"{TOKENS['alice']} client alice\n{TOKENS['bob']} client bob\n"
                              f"{TOKENS['admin']} admin\n{TOKENS['node']} node\n")
    sp = start_serve(d, "--auth-tokens", str(d / "tokens"))
    yield sp
    sp.stop()


def _subscriber(address: str, who: str, until: str) -> subprocess.Popen:
    env = {**os.environ, "KVPOOL_TOKEN": TOKENS[who]}
    sub = subprocess.Popen([sys.executable, SUBSCRIBER, f"grpc://{address}", "30", until],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert sub.stdout.readline().strip() == "subscribed", sub.stderr.read()
    return sub


def _hashes(sub: subprocess.Popen) -> tuple[set[str], list[list]]:
    out, err = sub.communicate(timeout=40)
    assert sub.returncode == 0, err
    batches = json.loads(out.strip().splitlines()[-1])
    assert [b["seq"] for b in batches] == list(range(1, len(batches) + 1))  # nothing lost
    events = [ev for b in batches for ev in b["events"]]
    return {h for ev in events if ev[0] in ("BlockStored", "BlockRemoved") for h in ev[1]}, events


def test_a_tenants_subscriber_never_receives_another_tenants_blocks(tenants_server):
    """alice's and bob's routers subscribe with their tokens, an operator's with an admin token;
    bob then alice publish, alice removes one block. Each tenant receives exactly its own
    hashes; the admin receives both (so the filter is the tenant, not a lost stream)."""
    address = tenants_server.address
    alice_ns, bob_ns, carol_ns = (fresh_namespace(tenant=t) for t in ("alice", "bob", "carol"))
    # The admin sees every tenant's removals: its subscriber ends at carol's, the last one.
    carol_removed = "BlockRemoved:" + carol_ns.keys(list(range(16)))[0].hex()
    subs = {who: _subscriber(address, who, until)
            for who, until in (("alice", "BlockRemoved"), ("bob", "BlockRemoved"), ("admin", carol_removed))}
    try:
        toks = list(range(16 * 3))
        with Client(address, bob_ns, token=TOKENS["bob"]) as bob:
            bob.publish(toks, random_blocks(3, seed=2))
            bob_keys = [k.hex() for k in bob_ns.keys(toks)]
            assert bob.remove(bob_ns.keys(toks)[2:]) == 1  # ends bob's subscriber
        with Client(address, alice_ns, token=TOKENS["alice"]) as alice:
            alice.publish(toks, random_blocks(3, seed=1))
            alice_keys = [k.hex() for k in alice_ns.keys(toks)]
            assert alice.remove(alice_ns.keys(toks)[2:]) == 1
        with Client(address, carol_ns, token=TOKENS["admin"]) as admin:  # its removal ends the admin's subscriber
            admin.publish(list(range(16)), random_blocks(1, seed=3))
            assert admin.remove(carol_ns.keys(list(range(16)))) == 1
        seen = {who: _hashes(sub) for who, sub in subs.items()}
    finally:
        for sub in subs.values():
            if sub.poll() is None:
                sub.kill()
    assert set(alice_keys).isdisjoint(bob_keys)  # same tokens, different tenants: different keys
    hashes, events = seen["alice"]
    assert hashes == set(alice_keys)
    assert ["BlockStored", alice_keys, None, [], 16, None, "CPU"] in events
    assert seen["bob"][0] == set(bob_keys)
    assert set(alice_keys) | set(bob_keys) | {carol_removed.split(":")[1]} <= seen["admin"][0]


def test_subscribe_events_needs_a_client_or_admin_token(tenants_server):
    with grpc.insecure_channel(tenants_server.address) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        for metadata, code in ((bearer_metadata(TOKENS["node"]), grpc.StatusCode.PERMISSION_DENIED),
                               ((), grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as info:
                next(admin.SubscribeEvents(admin_pb2.SubscribeEventsRequest(), metadata=metadata, timeout=10))
            assert info.value.code() == code, info.value.details()


def test_the_zmq_socket_stays_on_loopback_unless_insecure(tmp_path):
    """ZMQ PUB authenticates nobody and carries every tenant's events: binding it beyond this
    host is refused at start, saying what to do instead."""
    run = subprocess.run([sys.executable, "-m", "kvpool", "master", "--port", "0", "--metrics-port", "-1",
                          "--events-port", "0", "--events-host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "refusing to publish KV events on 0.0.0.0" in run.stderr and "SubscribeEvents" in run.stderr
    # --insecure: the operator says every host that reaches it is trusted.
    proc, _, lines = start_kvpool(["master", "--port", "0", "--metrics-port", "-1", "--events-port", "0",
                                   "--events-host", "0.0.0.0", "--insecure"], ready=r"ready grpc=", timeout=60)
    try:
        assert any("KV events on tcp://0.0.0.0:" in line for line in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_stopping_master_ends_its_event_streams_cleanly(tmp_path):
    """SIGTERM: each SubscribeEvents stream ends with OK (the subscriber knows the master
    stopped), rather than being cut off at the end of the shutdown grace."""
    sp = start_serve(tmp_path)
    try:
        with grpc.insecure_channel(sp.address) as ch:
            call = admin_pb2_grpc.AdminStub(ch).SubscribeEvents(admin_pb2.SubscribeEventsRequest(), timeout=60)
            call.initial_metadata()
            assert sp.stop() == 0
            assert list(call) == [] and call.code() == grpc.StatusCode.OK
    finally:
        sp.stop()
