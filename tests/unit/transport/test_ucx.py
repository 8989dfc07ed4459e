"""The UCX data plane between real processes: a child process serves a DRAM arena with
UcxArenaServer, this process GETs and PUTs with UcxTransport. No mocks.

On one host UCX moves the bytes with CMA where the kernel allows it (one-sided: the node's CPU
is idle, it may even be stopped), else over its TCP transport (the node's progress thread
serves them). Tests that depend on which say so and check what is true for the transport
UCX chose; one test forces TCP in both processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import xxhash

from kvpool.errors import IntegrityError, InvalidArgument, Unavailable
from kvpool.transport.base import Share, TransportCaps, TransportOptions
from kvpool.transport.endpoint import NodeEndpoint, UcxRegion
from kvpool.transport.ucx import UcxTransport, rma_transports
from kvpool.wire import RECORD_DTYPE, TIER_CODES
from tests.conftest import unavailable

ARENA = 32 << 20
KIB64, MIB2 = 64 << 10, 2 << 20

# The node: a DRAM arena registered with UCX; prints what describe() says, serves until its
# stdin closes.
NODE = r"""
import sys
from kvpool.tiers.dram import DramArena
from kvpool.node.ucx_server import UcxArenaServer

arena = DramArena(int(sys.argv[1]), chunk_bytes=2 << 20, prefault=False)
server = UcxArenaServer({"dram": arena.array})
server.start()
address, regions = server.describe()
r = regions[0]
print(address.hex(), r.tier, r.base, r.size, r.rkey.hex(), arena.segment.name, flush=True)
try:
    sys.stdin.read()
finally:
    server.close()
    arena.close()
"""


@pytest.fixture(autouse=True, scope="module")
def _ucx_installed():
    ok, reason = UcxTransport.available()
    if not ok:
        unavailable(reason)


class Node:
    def __init__(self, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", NODE, str(ARENA)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        line = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        if not line or not line[0].strip():
            self.proc.kill()
            raise RuntimeError(f"the UCX node did not start (exit {self.proc.wait()})")
        address, tier, base, size, rkey, self.shm = line[0].split()
        self.endpoint = NodeEndpoint(
            node_id=7, name="ucx-node", host_id="test-host", ucx_worker_address=bytes.fromhex(address),
            ucx_regions=(UcxRegion(tier, int(base), int(size), bytes.fromhex(rkey)),))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_stopped(self, timeout: float = 5.0) -> None:
        """SIGSTOP is delivered asynchronously: wait until the kernel shows the node stopped,
        so that CPU time it spends finishing its last slice is not counted against a read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            # Every thread: the group stop reaches UCX's progress thread on its own time.
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            if all(state in ("T", "t") for state in states):
                return
            time.sleep(0.01)
        raise AssertionError("node did not stop")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.unlink(f"/dev/shm/{self.shm}")  # left behind only when the node was killed
        except FileNotFoundError:
            pass


@pytest.fixture(scope="module")
def node():
    n = Node()
    yield n
    n.stop()


@pytest.fixture
def own_node():
    """A node this test may stop or kill."""
    n = Node()
    yield n
    n.stop()


def blocks(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]


def share_for(data, offsets, checksums=None):
    recs = np.zeros(len(data), dtype=RECORD_DTYPE)
    recs["node_id"] = 7
    recs["tier"] = TIER_CODES["dram"]
    recs["offset"] = offsets
    recs["size"] = [d.nbytes for d in data]
    recs["checksum"] = checksums if checksums is not None else [xxhash.xxh3_64_intdigest(d) for d in data]
    return Share(recs, np.arange(len(data)))


def test_import_never_needs_ucx():
    code = ("import kvpool.transport.ucx as m, sys; ok, why = m.UcxTransport.available(); "
            "print(ok, 'libucx' in sys.modules); print(why)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KVPOOL_UCX_LIBUCP": "/nonexistent/libucp.so"})
    assert out.returncode == 0, out.stderr
    first, why = out.stdout.split("\n", 1)
    assert first == "False False"
    assert "pip install libucx-cu12" in why and "ucxx-cu12" in why


def test_rma_transports_parses_lanes():
    info = ("#                 lane[0]:  2:tcp/lo.0 md[1]   -> md[1]/tcp/sysdev[255] seg 4294967295 am keepalive wireup\n"
            "#                 lane[1]:  5:cma/memory.0 md[4] -> md[4]/cma/sysdev[255] seg 4294967295 rma_bw#0\n")
    assert rma_transports(info) == ["cma"]
    assert rma_transports("") == []


def test_caps_and_reachable(node):
    assert UcxTransport.kind == "ucx"
    assert {TransportCaps.NETWORK, TransportCaps.ZERO_COPY, TransportCaps.REGISTERS_MEMORY,
            TransportCaps.ONE_SIDED} <= set(UcxTransport.caps)
    assert UcxTransport.reachable(node.endpoint, "dram")
    assert not UcxTransport.reachable(node.endpoint, "nvme")
    assert not UcxTransport.reachable(NodeEndpoint(1, "plain", "h", tcp_address="127.0.0.1:1"), "dram")


def test_put_get_roundtrip(node):
    t = UcxTransport.open(node.endpoint, "dram", TransportOptions())
    try:
        # The answer for ranking agrees with the transports UCX picked for this endpoint.
        assert t.rma_tls, "UCX chose no RMA lane"
        assert UcxTransport.one_sided_to(node.endpoint) == ("tcp" not in t.rma_tls)
        data = blocks([KIB64] * 8 + [MIB2] * 4, seed=1)
        offsets = [i * KIB64 for i in range(8)] + [(2 + i) * MIB2 for i in range(4)]
        share = share_for(data, offsets)
        t.write(share, data)
        outs = [np.zeros(d.nbytes, np.uint8) for d in data]
        t.read(share, outs)
        for d, o in zip(data, outs):
            assert np.array_equal(d, o)
        # Registered buffers take the memh path; bytes and torch CPU tensors work as sources.
        torch = pytest.importorskip("torch")
        more = blocks([MIB2, KIB64], seed=2)
        srcs = [bytes(more[0]), torch.from_numpy(more[1].copy())]
        dsts = [np.empty(MIB2, np.uint8), np.empty(KIB64, np.uint8)]
        t.register(dsts)
        share2 = share_for(more, [8 * MIB2, 10 * MIB2])
        t.write(share2, srcs)
        t.read(share2, dsts)
        assert np.array_equal(dsts[0], more[0]) and np.array_equal(dsts[1], more[1])
    finally:
        t.close()


def test_wrong_checksum_raises_integrity_error(node):
    t = UcxTransport.open(node.endpoint, "dram", TransportOptions())
    try:
        data = blocks([KIB64, KIB64], seed=3)
        offsets = [12 * MIB2, 12 * MIB2 + KIB64]
        t.write(share_for(data, offsets), data)
        good = xxhash.xxh3_64_intdigest(data[0])
        bad = share_for(data, offsets, checksums=[good, 12345])
        with pytest.raises(IntegrityError, match=f"offset {offsets[1]}"):
            t.read(bad, [np.empty(KIB64, np.uint8), np.empty(KIB64, np.uint8)])
        # A checksum failure is the block's, not the node's: the transport still works.
        outs = [np.empty(KIB64, np.uint8) for _ in data]
        t.read(share_for(data, offsets), outs)
        assert np.array_equal(outs[1], data[1])
    finally:
        t.close()


def test_bad_buffers_are_rejected(node):
    class CudaLike:
        __cuda_array_interface__ = {"shape": (KIB64,), "typestr": "|u1", "data": (0, False), "version": 3}

    t = UcxTransport.open(node.endpoint, "dram", TransportOptions())
    try:
        share = share_for(blocks([KIB64]), [0])
        with pytest.raises(InvalidArgument, match="CUDA"):
            t.read(share, [CudaLike()])
        with pytest.raises(InvalidArgument, match="bytes"):
            t.read(share, [np.empty(KIB64 - 1, np.uint8)])
        with pytest.raises(InvalidArgument, match="read-only"):
            t.read(share, [bytes(KIB64)])
        outside = share_for(blocks([KIB64]), [ARENA])
        with pytest.raises(InvalidArgument, match="outside"):
            t.write(outside, blocks([KIB64]))
    finally:
        t.close()


def test_two_threads_share_a_transport(node):
    t = UcxTransport.open(node.endpoint, "dram", TransportOptions(connections=2))
    errors = []

    def work(k):
        try:
            for round_ in range(5):
                data = blocks([KIB64] * 16, seed=100 * k + round_)
                share = share_for(data, [(4 + k) * MIB2 + i * KIB64 for i in range(16)])
                t.write(share, data)
                outs = [np.empty(KIB64, np.uint8) for _ in data]
                t.read(share, outs)
                assert all(np.array_equal(d, o) for d, o in zip(data, outs))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    t.close()
    assert not errors, errors


def test_idle_node_uses_no_cpu(node):
    before = node.cpu_seconds()
    time.sleep(1.0)
    assert node.cpu_seconds() - before < 0.1  # the progress thread sleeps on the event fd


def test_killed_node_makes_reads_unavailable(own_node):
    t = UcxTransport.open(own_node.endpoint, "dram", TransportOptions(io_timeout=2.0))
    try:
        data = blocks([MIB2], seed=4)
        share = share_for(data, [0])
        t.write(share, data)
        own_node.proc.kill()
        own_node.proc.wait()
        start = time.monotonic()
        with pytest.raises(Unavailable, match="ucx-node"):
            t.read(share, [np.empty(MIB2, np.uint8)])
        assert time.monotonic() - start < 2.0 + 1.0
        # The transport stays failed (the client drops it and asks the master again).
        with pytest.raises(Unavailable):
            t.write(share, data)
    finally:
        t.close()


def test_stopped_node(own_node):
    """One-sided (CMA): a stopped node's memory is still read and written. Two-sided (TCP):
    nothing moves, and the read gives up after the I/O timeout."""
    t = UcxTransport.open(own_node.endpoint, "dram", TransportOptions(io_timeout=1.0))
    try:
        data = blocks([MIB2, KIB64], seed=5)
        share = share_for(data, [0, MIB2])
        os.kill(own_node.proc.pid, signal.SIGSTOP)
        own_node.wait_stopped()
        if UcxTransport.one_sided_to(own_node.endpoint):
            cpu = own_node.cpu_seconds()
            t.write(share, data)
            outs = [np.empty(d.nbytes, np.uint8) for d in data]
            t.read(share, outs)
            assert np.array_equal(outs[0], data[0]) and np.array_equal(outs[1], data[1])
            assert own_node.cpu_seconds() == cpu
        else:
            start = time.monotonic()
            with pytest.raises(Unavailable, match="ucx-node"):
                t.write(share, data)
            assert 0.9 < time.monotonic() - start < 3.0
    finally:
        os.kill(own_node.proc.pid, signal.SIGCONT)
        t.close()


# A client in its own process, so that UCX_TLS=tcp applies to its UCX context too.
TCP_CLIENT = r"""
import json, sys, time, numpy as np, xxhash
from kvpool.errors import Unavailable
from kvpool.transport.base import Share, TransportOptions
from kvpool.transport.endpoint import NodeEndpoint, UcxRegion
from kvpool.transport.ucx import UcxTransport
from kvpool.wire import RECORD_DTYPE

address, tier, base, size, rkey, pid = sys.argv[1:]
ep = NodeEndpoint(7, "ucx-node", "h", ucx_worker_address=bytes.fromhex(address),
                  ucx_regions=(UcxRegion(tier, int(base), int(size), bytes.fromhex(rkey)),))
out = {"one_sided": UcxTransport.one_sided_to(ep)}
t = UcxTransport.open(ep, "dram", TransportOptions(io_timeout=1.0))
out["rma_tls"] = t.rma_tls
rng = np.random.default_rng(9)
data = [rng.integers(0, 256, n, dtype=np.uint8) for n in (2 << 20, 64 << 10)]
recs = np.zeros(2, RECORD_DTYPE)
recs["offset"] = [0, 2 << 20]
recs["size"] = [d.nbytes for d in data]
recs["checksum"] = [xxhash.xxh3_64_intdigest(d) for d in data]
share = Share(recs, np.arange(2))
t.write(share, data)
outs = [np.empty(d.nbytes, np.uint8) for d in data]
t.read(share, outs)
out["equal"] = all(np.array_equal(a, b) for a, b in zip(data, outs))
import os, signal
os.kill(int(pid), signal.SIGSTOP)
def stopped():  # SIGSTOP lands asynchronously: every thread of the node must show it
    tasks = os.listdir(f"/proc/{pid}/task")
    return all(open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0] in "Tt" for t in tasks)
deadline = time.monotonic() + 5
while not stopped() and time.monotonic() < deadline:
    time.sleep(0.01)
start = time.monotonic()
try:
    t.read(share, outs)
    out["stopped"] = "read succeeded"
except Unavailable as exc:
    out["stopped"] = "unavailable"
out["waited"] = time.monotonic() - start
os.kill(int(pid), signal.SIGCONT)
t.close()
print(json.dumps(out))
"""


def test_over_tcp_the_node_progresses():
    """UCX_TLS=tcp in both processes (as between hosts without RDMA): RMA is emulated, the
    node's progress thread serves it, and a stopped node times out."""
    node = Node(env={"UCX_TLS": "tcp"})
    try:
        a = node.endpoint
        r = a.ucx_regions[0]
        args = [a.ucx_worker_address.hex(), r.tier, str(r.base), str(r.size), r.rkey.hex(), str(node.proc.pid)]
        res = subprocess.run([sys.executable, "-c", TCP_CLIENT, *args], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "UCX_TLS": "tcp"})
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["one_sided"] is False
        assert out["rma_tls"] and set(out["rma_tls"]) == {"tcp"}
        assert out["equal"] is True
        assert out["stopped"] == "unavailable"
        assert 0.9 < out["waited"] < 3.0
    finally:
        node.stop()


def test_server_lifecycle_in_process():
    from kvpool.node.ucx_server import UcxArenaServer

    ok, _ = UcxArenaServer.available()
    assert ok
    arr = np.zeros(1 << 20, np.uint8)
    server = UcxArenaServer({"dram": arr})
    address, regions = server.describe()
    assert address and len(regions) == 1
    assert (regions[0].tier, regions[0].base, regions[0].size) == ("dram", arr.ctypes.data, arr.nbytes)
    assert regions[0].rkey
    server.start()
    time.sleep(0.05)
    server.close()
    server.close()  # idempotent
    with pytest.raises(ValueError):
        UcxArenaServer({"dram": np.zeros(16, np.uint8)[::2]})
