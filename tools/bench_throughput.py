#!/usr/bin/env python3
"""Cross-process put/get over the network data plane vs a raw socket, Redis, and a 64 KiB fetch.

A node and a client run in two processes: on two network-namespace hosts (tests/hosts.py)
when this runs as root with ``ip netns``, else both on loopback (``--where``). The node's
host runs ``kvpool serve`` (master and node), a raw-socket server (``--role socket-server``,
a few lines of Python with a prefaulted buffer) and ``redis-server``; the client's host runs
one measuring process (``--role client``) that, in the same run and round by round:

* puts and gets 2 MiB blocks in batches of 32, and 256 KiB blocks in batches of 64, through
  ``Client(transport="tcp")`` (checksums on both ways, as always);
* moves the same bytes, in the same batches, through plain sockets to the raw-socket server:
  a request header, the batch (``sendmsg`` of the blocks one way, ``recv_into`` preallocated
  buffers the other), an ack. kvpool's client splits a batch over 2 threads and connections
  (``copy_threads=2``), so the raw socket is measured with 1 and with 2 connections and the
  better of the two, each round, is the ceiling: parallelism never flatters a ratio;
* pipelines SET/GET of the same 2 MiB blocks to Redis through redis-py (what users know);
* fetches a published 16-token prompt (one 64 KiB block) over and over through
  ``Client.fetch``: Lookup, read, checks, what a decode worker waits for (p50, p99). For
  scale it also times a count-only Lookup, a gRPC health check and 64 KiB over the raw socket.

Then, if the node offers UCX (``--ucx true`` gives ``ucx=on`` in its ready line) and the
client accepts ``transport="ucx"``, a second node is started with UCX (the TCP numbers come
from a node without it) and one client process per UCX transport that ``ucx_info -d``
lists (``UCX_TLS=tcp``; ``tcp,sm`` on loopback, where the bytes go by shared memory/CMA;
``ib``) puts and gets the same blocks beside the same raw socket; the headline
``ucx_*_gbps`` is the best of them. Otherwise the UCX fields are null.

Statistics: a warm-up round first (not recorded), then ``--rounds`` rounds of ``--round-mib``
each. Every kvpool phase runs right beside its socket ceiling and the order flips each
round, so a slow spell of this noisy machine hits both sides of a ratio alike. GB/s are the
best round; a ratio is the median over rounds of kvpool / the same round's ceiling (same
direction, same block size); latencies are percentiles over all timed iterations.

The last line is JSON: {"bench":"throughput","where":"netns"|"loopback","tcp_put_gbps":…,
"tcp_get_gbps":…,"tcp_put_256k_gbps":…,"tcp_get_256k_gbps":…,"socket_gbps":…,
"tcp_put_ratio":…,"tcp_get_ratio":…,"ucx_put_gbps":…,"ucx_get_gbps":…,"redis_put_gbps":…,
"redis_get_gbps":…,"get_64k_p50_us":…,"get_64k_p99_us":…, and more: socket_put_gbps,
socket_get_gbps, socket_*_256k_gbps, tcp_*_256k_ratio, ucx_<tls>_*, …}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kvpool import KVLayout  # noqa: E402
from kvpool.transport.frames import recv_into_exact, send_buffers  # noqa: E402

#: name -> (layout, batch): the two block sizes the issue asks for.
SIZES = {
    "2m": (KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16), 32),
    "256k": (KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16), 64),
}
LATENCY_LAYOUT = KVLayout(num_layers=1, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16)  # 64 KiB
#: kvpool's client splits a batch over this many threads and connections (AsyncClient copy_threads).
CLIENT_STREAMS = 2

# Raw-socket framing: request = magic, op, block bytes, blocks, arena offset; reply = 8-byte ack.
_SOCK_REQ = struct.Struct("<4sBxxxIIQ")
_SOCK_MAGIC = b"BSK1"
_SOCK_ACK = b"ACK-ACK!"
_OP_PUT, _OP_GET = 1, 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================ raw socket

# The ceiling moves bytes with the same zero-copy helpers as kvpool's TCP data plane.
_recv_into = recv_into_exact
_sendmsg_all = send_buffers


def socket_server(bind: str, arena_bytes: int) -> int:
    """``--role socket-server``: recv_into / send from a preallocated, prefaulted arena."""
    arena = np.ones(arena_bytes, dtype=np.uint8)  # touched: no page faults while measuring
    srv = socket.create_server((bind, 0), backlog=64)
    print(f"socket-server ready port={srv.getsockname()[1]}", flush=True)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = bytearray(_SOCK_REQ.size)
        try:
            while True:
                _recv_into(conn, memoryview(head))
                magic, op, size, count, offset = _SOCK_REQ.unpack(head)
                if magic != _SOCK_MAGIC or offset + size * count > arena.size:
                    return
                views = [arena[offset + i * size:offset + (i + 1) * size] for i in range(count)]
                if op == _OP_PUT:
                    for v in views:
                        _recv_into(conn, memoryview(v))
                    conn.sendall(_SOCK_ACK)
                else:
                    _sendmsg_all(conn, [_SOCK_ACK, *views])
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class RawSocket:
    """The client end of the ceiling: ``streams`` connections, a batch split over them."""

    def __init__(self, address: str, streams: int, arena_bytes: int) -> None:
        host, _, port = address.rpartition(":")
        self.socks = []
        for _ in range(streams):
            s = socket.create_connection((host, int(port)), timeout=30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(s)
        self.arena_bytes = arena_bytes
        self.pool = ThreadPoolExecutor(streams) if streams > 1 else None

    def _one(self, sock, op: int, rows: list[np.ndarray], offset: int) -> None:
        if not rows:
            return
        size = rows[0].nbytes
        head = _SOCK_REQ.pack(_SOCK_MAGIC, op, size, len(rows), offset)
        if op == _OP_PUT:
            _sendmsg_all(sock, [head, *rows])
            ack = bytearray(len(_SOCK_ACK))
            _recv_into(sock, memoryview(ack))
        else:
            sock.sendall(head)
            ack = bytearray(len(_SOCK_ACK))
            _recv_into(sock, memoryview(ack))
            for r in rows:
                _recv_into(sock, memoryview(r))
        if bytes(ack) != _SOCK_ACK:
            raise ConnectionError("bad ack from the socket server")

    def batch(self, op: int, rows: list[np.ndarray], offset: int) -> None:
        """Move one batch, cut into contiguous parts like kvpool.client.shares.plan does."""
        n = len(self.socks)
        offset %= max(1, self.arena_bytes - sum(r.nbytes for r in rows) + 1)
        if n == 1:
            return self._one(self.socks[0], op, rows, offset)
        bounds = [len(rows) * k // n for k in range(n + 1)]
        size = rows[0].nbytes
        futs = [self.pool.submit(self._one, s, op, rows[a:b], offset + a * size)
                for s, a, b in zip(self.socks, bounds, bounds[1:])]
        for f in futs:
            f.result()

    def close(self) -> None:
        for s in self.socks:
            s.close()
        if self.pool:
            self.pool.shutdown()


# ============================================================================ the measuring client

def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _redis_connect(address: str, timeout: float = 15.0):
    import redis

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        # 1 MiB reads: redis-py's pure-Python parser otherwise loops on 64 KiB recv()s (no hiredis here)
        r = redis.Redis(host=host, port=int(port), socket_timeout=60, socket_read_size=1 << 20)
        try:
            r.ping()
            return r
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def client_main(args) -> dict:
    """``--role client``: every measurement in this one process; one JSON document out."""
    from kvpool import Client, Namespace

    out: dict = {"transport": args.transport, "sizes": {}, "kinds": {}}
    round_bytes = args.round_mib << 20
    rng = np.random.default_rng(0)
    for name in args.sizes.split(","):
        layout, batch = SIZES[name]
        size = layout.block_bytes
        blocks = max(batch, round_bytes // size // batch * batch)
        src = rng.integers(0, 255, size=(blocks, size), dtype=np.uint8)
        dst = np.ones_like(src)  # touched: no page faults while measuring
        src_rows, dst_rows = list(src), list(dst)
        res: dict[str, list[float]] = {}
        raws = {}
        if args.socket:
            raws = {n: RawSocket(args.socket, n, args.socket_arena) for n in sorted({1, CLIENT_STREAMS})}
        red = None
        if args.redis and name in args.redis_sizes.split(","):
            try:
                red = _redis_connect(args.redis)
            except Exception as exc:  # noqa: BLE001 - Redis is a comparison, not the subject
                out["redis_error"] = f"{type(exc).__name__}: {exc}"
        ns = Namespace(f"bench/throughput-{name}", layout)
        client = Client(args.master, ns, transport=args.transport, io_timeout=60.0)
        try:
            # Round 0 warms up (connections, registration, first touches) and is not recorded.
            for r in range(args.rounds + 1):
                count = blocks if r else min(blocks, 2 * batch)
                moved = count * size
                sink: dict[str, list[float]] = res if r else {}

                def add(key: str, gbps: float) -> None:
                    sink.setdefault(key, []).append(round(gbps, 4))

                keys = [os.urandom(16) for _ in range(count)]
                parts = [(i, min(i + batch, count)) for i in range(0, count, batch)]

                def sock(op: int, rows: list, raw: RawSocket) -> None:
                    for i, j in parts:
                        raw.batch(op, rows[i:j], i * size)

                def put() -> None:
                    for i, j in parts:
                        got = client.put_blocks(keys[i:j], src_rows[i:j])
                        if got.written != j - i:
                            raise RuntimeError(f"put wrote {got.written} of {j - i} blocks: {got}")

                def get() -> None:
                    dst[:count] = 1
                    t = time.perf_counter()
                    for i, j in parts:
                        client.get_blocks(keys[i:j], dst_rows[i:j])
                    add("kv_get", _gbps(moved, time.perf_counter() - t))
                    step = max(1, count // 16)
                    if not np.array_equal(src[:count:step], dst[:count:step]):
                        raise RuntimeError("kvpool get returned different bytes than were put")

                # Each kvpool phase sits next to its ceiling, and the order flips every round,
                # so a slow spell of the machine hits both sides of a ratio alike.
                steps = [
                    [lambda: [add(f"socket_put_{n}", _gbps(moved, _timed(lambda: sock(_OP_PUT, src_rows, raw))))
                              for n, raw in raws.items()],
                     lambda: add("kv_put", _gbps(moved, _timed(put)))],
                    [lambda: [add(f"socket_get_{n}", _gbps(moved, _timed(lambda: sock(_OP_GET, dst_rows, raw))))
                              for n, raw in raws.items()],
                     get],
                ]
                for pair in steps:
                    for step in (pair if r % 2 else pair[::-1]):
                        step()
                client.remove(keys)
                if red is not None:
                    rkeys = [b"bench:" + k for k in keys]

                    def rput() -> None:
                        for i, j in parts:
                            p = red.pipeline(transaction=False)
                            for k, v in zip(rkeys[i:j], src_rows[i:j]):
                                p.set(k, memoryview(v))
                            p.execute()

                    def rget() -> None:
                        for i, j in parts:
                            p = red.pipeline(transaction=False)
                            for k in rkeys[i:j]:
                                p.get(k)
                            vals = p.execute()
                            if any(v is None or len(v) != size for v in vals):
                                raise RuntimeError("redis GET returned a missing or short value")

                    add("redis_put", _gbps(moved, _timed(rput)))
                    add("redis_get", _gbps(moved, _timed(rget)))
                    red.flushall()
                if not r:
                    continue
                log(f"  [{args.transport}] {name} round {r}/{args.rounds}: "
                    + ", ".join(f"{k} {v[-1]:.2f}" for k, v in res.items()))
            out["kinds"].update(client._async.transports.open_kinds())
            if args.latency and name == args.sizes.split(",")[0]:
                out["latency"] = latency(args, raws.get(1))
        finally:
            client.close()
            for raw in raws.values():
                raw.close()
            if red is not None:
                red.close()
        out["sizes"][name] = res
    return out


def latency(args, raw: RawSocket | None) -> dict:
    """Fetch one published 64 KiB block (16 tokens) again and again: Lookup + read + checks."""
    from kvpool import Client, Namespace

    ns = Namespace("bench/throughput-latency", LATENCY_LAYOUT)
    size = LATENCY_LAYOUT.block_bytes
    tokens = list(range(1000, 1000 + LATENCY_LAYOUT.block_tokens))
    block = np.random.default_rng(7).integers(0, 255, size=(1, size), dtype=np.uint8)
    out = np.ones_like(block)
    fetch_us, match_us, sock_us, rpc_us = [], [], [], []
    with Client(args.master, ns, transport=args.transport) as c:
        c.publish(tokens, block)
        for i in range(args.warmup + args.latency):
            t = time.perf_counter()
            hit = c.fetch(tokens, out)
            dt = time.perf_counter() - t
            if hit != 1:
                raise RuntimeError(f"fetch of the published prompt hit {hit} blocks, not 1")
            if i >= args.warmup:
                fetch_us.append(dt * 1e6)
        if not np.array_equal(out, block):
            raise RuntimeError("fetch returned different bytes than were published")
        # Where the time goes: the Lookup RPC alone (count only, no lease) and the bytes alone.
        for i in range(args.warmup + args.latency // 2):
            t = time.perf_counter()
            c.match(tokens)
            if i >= args.warmup:
                match_us.append((time.perf_counter() - t) * 1e6)
    # The floor of any RPC here: a gRPC health check to the master, the smallest call it serves.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.master) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for i in range(args.warmup + args.latency // 2):
            t = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest())
            if i >= args.warmup:
                rpc_us.append((time.perf_counter() - t) * 1e6)
    if raw is not None:
        rows = list(out)
        for i in range(args.warmup + args.latency // 2):
            t = time.perf_counter()
            raw.batch(_OP_GET, rows, 0)
            if i >= args.warmup:
                sock_us.append((time.perf_counter() - t) * 1e6)

    def pct(xs, q):
        return round(float(np.percentile(xs, q)), 1) if xs else None

    return {"fetch_p50_us": pct(fetch_us, 50), "fetch_p99_us": pct(fetch_us, 99), "fetch_n": len(fetch_us),
            "match_p50_us": pct(match_us, 50), "grpc_health_p50_us": pct(rpc_us, 50), "socket_64k_p50_us": pct(sock_us, 50),
            "socket_64k_p99_us": pct(sock_us, 99)}


# ============================================================================ orchestration

class Side:
    """Where a process runs: a tests/hosts.py Host, or this machine (loopback)."""

    def __init__(self, host=None) -> None:
        self.host = host
        self.address = host.address if host else "127.0.0.1"
        self.procs: list[subprocess.Popen] = []

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        p = self.host.popen(argv, **kw) if self.host else subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KVPOOL_", "UCX_"))}


def _make_network(where: str):
    """(Network or None, why loopback). ``auto`` falls back to loopback, ``netns`` must work."""
    if where == "loopback":
        return None, "asked for"
    if os.geteuid() != 0 and where == "auto":
        return None, "not root (network namespaces need root)"
    # tests/conftest.py imports torch unless TRITON_INTERPRET is set; it is not needed here.
    had = "TRITON_INTERPRET" in os.environ
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from tests.hosts import Network

        return Network(["node", "client"]), ""
    except BaseException as exc:  # noqa: BLE001 - pytest.fail (tests.conftest.unavailable) is a BaseException
        if where == "netns" or isinstance(exc, KeyboardInterrupt):
            raise
        return None, f"network namespaces unavailable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    finally:
        if not had:
            os.environ.pop("TRITON_INTERPRET", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ucx_wanted() -> tuple[bool, str]:
    """Whether to ask the node for UCX: the transport and its node half exist and say they work."""
    import importlib.util

    try:
        if importlib.util.find_spec("kvpool.node.ucx_server") is None:
            return False, "kvpool.node.ucx_server does not exist yet"
        from kvpool import AsyncClient

        try:  # the constructor refuses a transport the client does not speak; it connects nothing
            AsyncClient("127.0.0.1:1", transport="ucx")._pool.shutdown()
        except ValueError as exc:
            return False, f"Client(transport='ucx') is refused: {exc}"
        from kvpool.transport.ucx import UcxTransport

        avail = getattr(UcxTransport, "available", None)
        if avail is not None:
            ok, why = avail()
            if not ok:
                return False, f"UcxTransport unavailable: {why}"
        return True, ""
    except Exception as exc:  # noqa: BLE001 - optional: any failure means no UCX numbers
        return False, f"{type(exc).__name__}: {exc}"


def _ucx_tls(client: Side) -> list[str]:
    """UCX_TLS values to try, from ``ucx_info -d`` on the client's host (one per fabric)."""
    exe, env = shutil.which("ucx_info"), dict(os.environ)
    try:
        import libucx  # the wheel that brings libucp and its tools

        base = os.path.dirname(libucx.__file__)
        if os.path.exists(os.path.join(base, "bin", "ucx_info")):
            exe = os.path.join(base, "bin", "ucx_info")
            env["LD_LIBRARY_PATH"] = os.path.join(base, "lib") + ":" + env.get("LD_LIBRARY_PATH", "")
    except ImportError:
        pass
    if not exe:
        return ["default"]
    argv = [exe, "-d"]
    try:
        cmd = client.host.command(argv) if client.host else argv
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ["default"]
    found = {line.split(":", 1)[1].strip() for line in text.splitlines() if "Transport:" in line}
    # kvpool's endpoints ask for peer failure handling, which needs an active-message lane
    # that has it: shared-memory transports do not, so they come with tcp (which then carries
    # only wireup and control while the bytes go by shared memory/CMA).
    tls = []
    if "tcp" in found:
        tls.append("tcp")
        if found & {"posix", "sysv", "cma", "xpmem", "knem"}:
            tls.append("tcp,sm")  # sm: UCX's alias for every shared-memory transport, cma included
    if any(t.startswith(("rc", "dc", "ud")) for t in found):
        tls.append("ib")  # UCX's alias for the verbs transports
    return tls or ["default"]


def _run_client(side: Side, argv: list[str], env: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "client", *argv]
    p = side.popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    try:
        stdout, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return {"error": f"client timed out after {timeout:.0f} s"}
    lines = [line for line in (stdout or "").splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"client exited with {p.returncode}"}
    return json.loads(lines[-1])


def _best(xs):
    return max(xs) if xs else None


def _r(x, nd=3):
    return round(x, nd) if isinstance(x, float) else x


class Node:
    """A ``kvpool serve`` (master and node) on the node's side, stopped and its segment unlinked."""

    READY = r"serve ready grpc=(\S+) .*data=(\S+) ucx=(\S+) .*shm=(\S+)"

    def __init__(self, side: Side, dram_mib: int, data_dir: str, ucx: bool) -> None:
        from tests.conftest import start_kvpool

        argv = ["serve", "--host", side.address, "--insecure", "--port", "0", "--metrics-port", "-1", "--data-port", "0",
                "--dram", f"{dram_mib}MiB", "--prefault", "true", "--data-dir", data_dir]
        if ucx:
            argv += ["--ucx", "true"]
        started: list[subprocess.Popen] = []

        def popen(*a, **kw) -> subprocess.Popen:
            started.append(side.popen(*a, **kw))
            return started[-1]

        try:
            self.proc, m, self.log = start_kvpool(argv, self.READY, popen=popen, timeout=120)
        except BaseException:
            for p in started:  # killed by start_kvpool, or dying: its segment (tiers/dram.py names it) stays
                if p.poll() is None:
                    p.kill()
                p.wait()
                for path in glob.glob(f"/dev/shm/kvpool-{p.pid}-*"):
                    os.unlink(path)
            raise
        self.master, self.data, self.ucx, self.shm = m.group(1), m.group(2), m.group(3) == "on", m.group(4)

    def tail(self) -> str:
        return "".join(self.log[-20:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.shm):  # unlinked by the node on SIGTERM; not after a crash
            os.unlink(self.shm)


def orchestrate(args) -> dict:
    net, why = _make_network(args.where)
    where = "netns" if net else "loopback"
    side = Side(net.hosts["node"] if net else None)
    client = Side(net.hosts["client"] if net else None)
    tmp = tempfile.mkdtemp(prefix="kvpool-bench-throughput-")
    nodes: list[Node] = []
    try:
        round_bytes = args.round_mib << 20
        # Each size class keeps up to two rounds alive (removal of a leased block is deferred
        # until its lease is released in the background), plus the latency block: no eviction.
        dram_mib = 2 * args.round_mib * len(SIZES) + 256
        log(f"bench_throughput: {where}{f' ({why})' if why else ''}; starting kvpool serve "
            f"(DRAM {dram_mib} MiB, prefaulted), a socket server and redis-server on {side.address}")
        # The TCP node runs without UCX, so that no UCX progress thread shares its two cores.
        node = Node(side, dram_mib, os.path.join(tmp, "data"), ucx=False)
        nodes.append(node)
        sock_srv = side.popen([sys.executable, os.path.abspath(__file__), "--role", "socket-server",
                               "--bind", side.address, "--socket-arena", str(round_bytes)],
                              stdout=subprocess.PIPE, text=True, env=_clean_env())
        line = sock_srv.stdout.readline()
        if "port=" not in line:
            raise RuntimeError(f"the socket server did not start: {line!r}")
        sock_addr = f"{side.address}:{line.strip().rsplit('=', 1)[1]}"
        redis_addr = None
        redis_exe = shutil.which("redis-server")
        if redis_exe and not args.no_redis:
            port = 6379 if net else _free_port()
            side.popen([redis_exe, "--bind", side.address, "--port", str(port), "--save", "", "--appendonly", "no",
                        "--protected-mode", "no", "--dir", tmp, "--loglevel", "warning",
                        "--client-query-buffer-limit", "1gb", "--proto-max-bulk-len", "512mb"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            redis_addr = f"{side.address}:{port}"
        common = ["--rounds", str(args.rounds), "--round-mib", str(args.round_mib), "--socket-arena", str(round_bytes)]
        log(f"master {node.master}, data server {node.data}, raw socket server {sock_addr}, redis {redis_addr}")
        main_run = _run_client(client, [*common, "--master", node.master, "--transport", "tcp",
                                        "--sizes", ",".join(SIZES), "--socket", sock_addr,
                                        *(["--redis", redis_addr] if redis_addr else []),
                                        "--latency", str(args.latency), "--warmup", str(args.warmup)],
                               _clean_env(), timeout=args.client_timeout)
        if "error" in main_run:
            raise RuntimeError(f"the measuring client failed: {main_run['error']}\nnode log:\n{node.tail()}")
        if node.proc.poll() is not None:
            raise RuntimeError(f"kvpool serve died during the run:\n{node.tail()}")
        if set(main_run["kinds"].values()) != {"tcp"}:
            raise RuntimeError(f"the client moved blocks with {main_run['kinds']}, not only tcp")
        node.stop()

        ucx_runs: dict = {}
        ucx, ucx_why = _ucx_wanted() if not args.no_ucx else (False, "--no-ucx")
        if ucx:
            log("starting a node with --ucx true")
            try:
                node = Node(side, dram_mib, os.path.join(tmp, "data-ucx"), ucx=True)
                nodes.append(node)
                if not node.ucx:
                    ucx, ucx_why = False, "the node's ready line says ucx=off"
            except RuntimeError as exc:
                ucx, ucx_why = False, f"the node did not start with --ucx true: {str(exc).strip().splitlines()[-1]}"
        if ucx:
            for tls in _ucx_tls(client):
                if "sm" in tls.split(",") and net is not None:
                    # These "hosts" share one kernel, so UCX would reach across them by CMA,
                    # which no two real hosts can: not a cross-host number.
                    ucx_runs[tls] = {"error": "skipped in netns: the hosts share a kernel, so CMA would reach "
                                              "across them as it never does between real hosts"}
                    continue
                env = _clean_env()
                if tls != "default":
                    env["UCX_TLS"] = tls
                log(f"ucx with UCX_TLS={tls}")
                got = _run_client(client, [*common, "--master", node.master, "--transport", "ucx",
                                           "--sizes", ",".join(SIZES), "--socket", sock_addr, "--latency", "0"],
                                  env, timeout=args.client_timeout)
                if "error" not in got and "ucx" not in got.get("kinds", {}).values():
                    got = {"error": f"the client moved the blocks with {sorted(set(got['kinds'].values()))}, not ucx"}
                ucx_runs[tls] = got
        return summarize(where, why, main_run, ucx_runs, ucx_why, args)
    finally:
        client.stop()
        for n in nodes:
            n.stop()
        side.stop()
        if net is not None:
            net.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _reduce(sizes: dict) -> tuple[dict, dict, dict]:
    """Per block size: best GB/s of each series, the best socket ceiling of each direction, and
    the median over rounds of kvpool / the ceiling measured beside it in the same round."""
    best = {size: {k: _best(v) for k, v in res.items()} for size, res in sizes.items()}
    ceil, paired = {}, {}
    for size, res in sizes.items():
        for d in ("put", "get"):
            per_round = [max(vs) for vs in zip(*(v for k, v in res.items() if k.startswith(f"socket_{d}_")))]
            if not per_round or not res.get(f"kv_{d}"):
                continue
            ceil[size, d] = max(per_round)
            paired[size, d] = round(statistics.median(k / c for k, c in zip(res[f"kv_{d}"], per_round)), 3)
    return best, ceil, paired


def summarize(where, why, run, ucx_runs, ucx_why, args) -> dict:
    best, ceil, paired = _reduce(run["sizes"])
    b2, b256 = best["2m"], best["256k"]
    lat = run.get("latency", {})
    ucx_fields: dict = {}
    ucx_best: dict = {"put": (None, None), "get": (None, None)}  # direction -> (GB/s, ratio)
    for tls, r in ucx_runs.items():
        tag = tls.replace(",", "_")
        if "error" in r:
            ucx_fields[f"ucx_{tag}_error"] = r["error"][:200]
            continue
        u_best, _, u_paired = _reduce(r["sizes"])
        for size in r["sizes"]:
            for d in ("put", "get"):
                v = u_best[size].get(f"kv_{d}")
                suffix = "" if size == "2m" else f"_{size}"
                ucx_fields[f"ucx_{tag}_{d}{suffix}_gbps"] = _r(v)
                ucx_fields[f"ucx_{tag}_{d}{suffix}_ratio"] = u_paired.get((size, d))
                if size == "2m" and v and (ucx_best[d][0] is None or v > ucx_best[d][0]):
                    ucx_best[d] = (v, u_paired.get((size, d)))
    socket_put, socket_get = ceil["2m", "put"], ceil["2m", "get"]
    out = {
        "bench": "throughput", "where": where,
        "tcp_put_gbps": _r(b2["kv_put"]), "tcp_get_gbps": _r(b2["kv_get"]),
        "tcp_put_256k_gbps": _r(b256["kv_put"]), "tcp_get_256k_gbps": _r(b256["kv_get"]),
        # The mean of the two directions' ceilings (2 MiB blocks); each ratio uses its own direction's.
        "socket_gbps": _r((socket_put + socket_get) / 2),
        "tcp_put_ratio": paired["2m", "put"], "tcp_get_ratio": paired["2m", "get"],
        "ucx_put_gbps": _r(ucx_best["put"][0]), "ucx_get_gbps": _r(ucx_best["get"][0]),
        "redis_put_gbps": _r(b2.get("redis_put")), "redis_get_gbps": _r(b2.get("redis_get")),
        "get_64k_p50_us": lat.get("fetch_p50_us"), "get_64k_p99_us": lat.get("fetch_p99_us"),
        "socket_put_gbps": _r(socket_put), "socket_get_gbps": _r(socket_get),
        "socket_put_256k_gbps": _r(ceil["256k", "put"]), "socket_get_256k_gbps": _r(ceil["256k", "get"]),
        "tcp_put_256k_ratio": paired["256k", "put"], "tcp_get_256k_ratio": paired["256k", "get"],
        "ucx_put_ratio": ucx_best["put"][1], "ucx_get_ratio": ucx_best["get"][1],
        **ucx_fields,
        "socket_64k_p50_us": lat.get("socket_64k_p50_us"), "lookup_p50_us": lat.get("match_p50_us"),
        "grpc_health_p50_us": lat.get("grpc_health_p50_us"),
        "rounds": args.rounds, "round_mib": args.round_mib,
        "stat": "GB/s: best round; ratios: median over rounds of kvpool / the same round's socket ceiling",
    }
    out["_human"] = _human(out, best, ceil, paired, run, ucx_runs, ucx_why, why)
    return out


def _human(o, best, ceil, paired, run, ucx_runs, ucx_why, why) -> list[str]:
    def f(x, fmt="{:.2f}"):
        return fmt.format(x) if x is not None else "n/a"

    lines = [f"where: {o['where']}{f' ({why})' if why else ''}; client transports used: "
             f"{sorted(set(run['kinds'].values()))}; best of {o['rounds']} rounds of {o['round_mib']} MiB"]
    for size, label, batch in (("2m", "2 MiB", 32), ("256k", "256 KiB", 64)):
        b = best[size]
        for d in ("put", "get"):
            streams = ", ".join(f"{k.rsplit('_', 1)[1]} conn {b[k]:.2f}" for k in sorted(b) if k.startswith(f"socket_{d}_"))
            lines.append(f"{label} x {batch}: tcp {d} {f(b[f'kv_{d}'])} GB/s, raw socket {f(ceil[size, d])} "
                         f"({streams}); kvpool/socket in the same round: median {f(paired[size, d], '{:.3f}')}")
    lines.append(f"redis (2 MiB x 32, pipelined, redis-py): SET {f(o['redis_put_gbps'])} GB/s, "
                 f"GET {f(o['redis_get_gbps'])} GB/s{' (' + run['redis_error'] + ')' if 'redis_error' in run else ''}")
    if ucx_runs:
        for tls, r in ucx_runs.items():
            tag = tls.replace(",", "_")
            if "error" in r:
                lines.append(f"ucx UCX_TLS={tls}: failed: {r['error'][:200]}")
            else:
                def one(d: str, suffix: str) -> str:
                    g, q = o.get(f"ucx_{tag}_{d}{suffix}_gbps"), o.get(f"ucx_{tag}_{d}{suffix}_ratio")
                    return f"{d} {f(g)} GB/s ({f(q, '{:.3f}')} of the socket)"

                lines.append(f"ucx UCX_TLS={tls}: 2 MiB {one('put', '')}, {one('get', '')}; "
                             f"256 KiB {one('put', '_256k')}, {one('get', '_256k')}")
    else:
        lines.append(f"ucx: not measured ({ucx_why})")
    lines.append(f"fetch of one 64 KiB block (lookup + read): p50 {f(o['get_64k_p50_us'], '{:.0f}')} us, "
                 f"p99 {f(o['get_64k_p99_us'], '{:.0f}')} us; for scale, the Lookup RPC alone p50 "
                 f"{f(o['lookup_p50_us'], '{:.0f}')} us, a gRPC health check p50 "
                 f"{f(o['grpc_health_p50_us'], '{:.0f}')} us, 64 KiB over the raw socket p50 "
                 f"{f(o['socket_64k_p50_us'], '{:.0f}')} us")
    checks = [("tcp put 2 MiB >= 0.80", o["tcp_put_ratio"], 0.80), ("tcp get 2 MiB >= 0.80", o["tcp_get_ratio"], 0.80),
              ("tcp put 256 KiB >= 0.60", o["tcp_put_256k_ratio"], 0.60),
              ("tcp get 256 KiB >= 0.60", o["tcp_get_256k_ratio"], 0.60)]
    verdict = [f"{name}: {'ok' if v is not None and v >= t else 'MISSED'} ({f(v, '{:.3f}')})" for name, v, t in checks]
    p50 = o["get_64k_p50_us"]
    verdict.append(f"64 KiB fetch p50 <= 1000 us: {'ok' if p50 is not None and p50 <= 1000 else 'MISSED'}")
    lines.append("targets: " + "; ".join(verdict))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (under a minute): fewer, smaller rounds")
    ap.add_argument("--where", choices=("auto", "netns", "loopback"), default="auto",
                    help="two network-namespace hosts (needs root and ip netns), loopback, or netns when possible")
    ap.add_argument("--rounds", type=int, help="rounds per measurement (default 9; --quick 5)")
    ap.add_argument("--round-mib", type=int, help="MiB of blocks per round (default 384; --quick 128)")
    ap.add_argument("--latency", type=int, help="timed 64 KiB fetches (default 2000; --quick 500)")
    ap.add_argument("--warmup", type=int, default=100, help="untimed fetches first (default 100)")
    ap.add_argument("--no-redis", action="store_true", help="skip Redis")
    ap.add_argument("--no-ucx", action="store_true", help="skip UCX even when the node offers it")
    ap.add_argument("--client-timeout", type=float, default=480.0, help=argparse.SUPPRESS)
    # Internal roles: the processes this benchmark starts on each side.
    ap.add_argument("--role", choices=("main", "client", "socket-server"), default="main", help=argparse.SUPPRESS)
    ap.add_argument("--bind", help=argparse.SUPPRESS)
    ap.add_argument("--socket-arena", type=int, default=512 << 20, help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    ap.add_argument("--redis", help=argparse.SUPPRESS)
    ap.add_argument("--redis-sizes", default="2m", help=argparse.SUPPRESS)
    ap.add_argument("--transport", default="tcp", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="2m,256k", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 5 if args.quick else 9
    if args.round_mib is None:
        args.round_mib = 128 if args.quick else 384
    if args.latency is None:
        args.latency = 500 if args.quick else 2000

    if args.role == "socket-server":
        return socket_server(args.bind, args.socket_arena)
    if args.role == "client":
        try:
            out = client_main(args)
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, which decides
            import traceback

            traceback.print_exc()
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
        return 0

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every process, namespace and segment is cleaned up.
    def _stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    t0 = time.monotonic()
    try:
        result = orchestrate(args)
    except KeyboardInterrupt as exc:
        print(f"bench_throughput: interrupted ({exc or 'Ctrl-C'}); processes, namespaces and segments removed",
              file=sys.stderr)
        return 130
    for line in result.pop("_human"):
        print(line)
    print(f"({time.monotonic() - t0:.0f} s)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
