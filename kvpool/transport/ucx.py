"""One-sided UCX data plane, client side: GET and PUT straight between the client's buffers
and the node's slots (in the manner of Mooncake's transfer engine).

The node maps its DRAM arena with UCX once (:class:`kvpool.node.ucx_server.UcxArenaServer`)
and publishes its worker address, the arena's base address and the packed remote key in its
:class:`~kvpool.transport.endpoint.NodeEndpoint`. A client connects an endpoint to that worker
address, unpacks the remote key once per endpoint, and then a read is one ``ucp_get_nbx`` per
block (``base + record.offset``, ``record.size`` bytes) and a write one ``ucp_put_nbx`` per
block followed by ``ucp_ep_flush_nbx``, so a write returns only when its bytes are in the
node's memory. Reads verify each block's xxh3-64 before returning.

Whether the node's CPU takes part depends on the transport UCX picks for RMA:

* on one host, CMA (``process_vm_readv``/``writev``): one-sided; the copy runs in the
  client's thread, the node does nothing (it may even be stopped);
* between hosts with a verbs-enabled UCX (RDMA NICs): one-sided (``rc``/``dc``);
* between hosts over plain TCP (the only choice with the ``libucx-cu12`` wheel, which is
  built without verbs): UCX emulates RMA with active messages, which the node's progress
  thread serves. It works, but it is two-sided and slower than kvpool's own TCP transport.

:meth:`UcxTransport.one_sided_to` tells which (it asks UCX which transport an endpoint to
that node would use for RMA), for ranking; :meth:`UcxTransport.reachable` says only whether
UCX can reach the node at all, so a user can force ``transport="ucx"`` either way.

Security: there is no per-request capability check on this path. RMA bypasses the node's
CPU, so the node cannot check the master's HMAC for each GET or PUT: the remote key is the
capability, and whoever holds it (every client the master shows the node's endpoint to) can
read and write any slot of the arena at any time, past any grant or lease. With CMA the key
is weaker still: it names the node's process, and CMA reads and writes any address there
(the kernel allows it to processes that may ptrace the node: the same user; where Yama's
``ptrace_scope`` is 1, UCX itself calls ``prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)`` in
the node to allow it). Enable UCX on a
node only where every client is trusted with every block of that node (one tenant, on a
private fabric); elsewhere use the TCP transport, whose server checks each capability.

Threads: a client's copy threads may call :meth:`read` and :meth:`write` at once. Workers
are process-wide, a small pool (``options.connections`` of them, created on first use) with a
lock each; a batch takes a free worker, and each transport keeps one UCX endpoint and
unpacked remote key per worker. The UCX library is loaded only when a transport is first
used; importing this module never fails, and :meth:`UcxTransport.available` says how to
install UCX when it is missing.
"""

from __future__ import annotations

import bisect
import re
import threading
from contextlib import contextmanager
from typing import Sequence

import numpy as np

from kvpool.errors import InvalidArgument, Unavailable
from kvpool.transport.base import BlockIntegrityError, Share, Transport, TransportCaps, TransportOptions
from kvpool.transport.endpoint import NodeEndpoint, UcxRegion

__all__ = ["UcxTransport", "rma_transports"]

#: UCX settings for kvpool's contexts, unless the environment sets them (``UCX_<NAME>``).
#: Rendezvous is a tag/AM protocol kvpool never uses; declaring it off lets UCX pick
#: transports without memory invalidation (CMA) for RMA on endpoints that report peer
#: failures, instead of emulating RMA over TCP.
UCX_DEFAULTS = {"RNDV_THRESH": "inf"}
#: Clients also turn UCX's keepalive off: with it on, a flush waits for the node's CPU (it
#: would not complete while the node is busy or stopped, even over CMA), and a client needs
#: none: a dead node shows as a transport error (CMA, TCP reset) or as no progress for
#: ``io_timeout``.
CLIENT_DEFAULTS = {**UCX_DEFAULTS, "KEEPALIVE_INTERVAL": "inf"}

#: UCX transports that move RMA bytes with the peer's CPU (RMA emulated on messages).
_TWO_SIDED_TLS = frozenset({"tcp"})

_LANE = re.compile(r"lane\[\d+\]:\s*\d+:([A-Za-z0-9_]+)/")


def rma_transports(info: str) -> list[str]:
    """The UCX transports of an endpoint's RMA bandwidth lanes, from ``ucp_ep_print_info``."""
    out = []
    for line in info.splitlines():
        m = _LANE.search(line)
        if m and "rma_bw" in line:
            out.append(m.group(1))
    return out


class _Lane:
    """One worker of the process-wide pool and the lock that serializes its use."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.lock = threading.Lock()


class _Ucx:
    """Process-wide UCX state of clients: one context, a pool of workers, probe results."""

    _instance: "_Ucx | None" = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        from kvpool.transport import ucp

        self.ucp = ucp
        self.context = ucp.Context(name="kvpool-client", defaults=CLIENT_DEFAULTS)
        self.lanes: list[_Lane] = []
        self._lock = threading.Lock()
        self._next = 0
        self._one_sided: dict[bytes, tuple[bool, list[str]]] = {}

    @classmethod
    def get(cls) -> "_Ucx":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def pool(self, size: int) -> list[_Lane]:
        with self._lock:
            while len(self.lanes) < max(1, size):
                self.lanes.append(_Lane(self.context.worker(name=f"kvpool-client-{len(self.lanes)}")))
            return self.lanes

    @contextmanager
    def lane(self, size: int):
        """A worker of the pool, held: the first free one, else wait for one in turn."""
        lanes = self.pool(size)[: max(1, size)]
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(lanes)
        order = lanes[start:] + lanes[:start]
        for lane in order:
            if lane.lock.acquire(blocking=False):
                break
        else:
            lane = order[0]
            lane.lock.acquire()
        try:
            yield lane
        finally:
            lane.lock.release()

    def probe(self, address: bytes) -> tuple[bool, list[str]]:
        """(one-sided, RMA transports) of an endpoint to the worker at ``address``. Cached."""
        with self._lock:
            known = self._one_sided.get(address)
        if known is not None:
            return known
        lane = self.pool(1)[0]
        with lane.lock:
            ep = lane.worker.connect(address, peer_errors=True, name="kvpool-probe")
            try:
                tls = rma_transports(ep.info())
            finally:
                ep.close(force=True)
        result = (bool(tls) and not (set(tls) & _TWO_SIDED_TLS), tls)
        with self._lock:
            self._one_sided[address] = result
        return result


def _host_array(buf, *, writable: bool, what: str) -> np.ndarray:
    """A flat uint8 view of a host buffer (no copy), or InvalidArgument saying why not."""
    if getattr(buf, "is_cuda", False) or hasattr(buf, "__cuda_array_interface__"):
        raise InvalidArgument(
            f"the ucx transport moves host memory only: {what} is a CUDA buffer, and this UCX "
            f"build has no CUDA memory support here; copy it to host memory first, or use a "
            f"transport that declares DEVICE_BUFFERS")
    if isinstance(buf, np.ndarray):
        arr = buf
    elif type(buf).__module__.startswith("torch"):
        if not buf.is_contiguous():
            raise InvalidArgument(f"{what} must be contiguous")
        arr = buf.detach().reshape(-1).view(__import__("torch").uint8).numpy()
    else:
        try:
            arr = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{what} is not a host buffer ({type(buf).__name__}): {exc}") from None
    if not arr.flags.c_contiguous:
        raise InvalidArgument(f"{what} must be contiguous")
    if writable and not arr.flags.writeable:
        raise InvalidArgument(f"{what} is read-only")
    if arr.dtype != np.uint8:
        arr = arr.reshape(-1).view(np.uint8)
    return arr.reshape(-1)


class _Registry:
    """Client buffers mapped with UCX (memh), found by address range; keeps the buffers alive."""

    def __init__(self, context) -> None:
        self.context = context
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, object, np.ndarray]] = []  # (start, end, memh, array)
        self._lock = threading.Lock()

    def add(self, arr: np.ndarray) -> None:
        start, size = arr.ctypes.data, arr.nbytes
        if size == 0 or self.lookup(start, size):
            return
        memh = self.context.mem_map(start, size, remote=False)
        with self._lock:
            i = bisect.bisect_right(self._starts, start)
            self._starts.insert(i, start)
            self._entries.insert(i, (start, start + size, memh, arr))

    def lookup(self, start: int, size: int) -> int | None:
        """The memh handle of a registration covering [start, start + size), if any."""
        with self._lock:
            i = bisect.bisect_right(self._starts, start)
            # Registrations may overlap: look back over all that start at or before it.
            for j in range(i - 1, -1, -1):
                s, e, memh, _ = self._entries[j]
                if s <= start and start + size <= e:
                    return memh.handle
        return None

    def close(self) -> None:
        with self._lock:
            entries, self._entries, self._starts = self._entries, [], []
        for _, _, memh, _ in entries:
            memh.unmap()


class _Conn:
    """This transport's endpoint and unpacked remote key on one worker of the pool."""

    def __init__(self, ep, rkey) -> None:
        self.ep = ep
        self.rkey = rkey


class UcxTransport(Transport):
    """GET/PUT with UCX RMA to one tier of one node (see the module docstring).

    ``caps`` declares ONE_SIDED for ranking, but whether a given node is reached one-sidedly
    depends on the fabric: :meth:`one_sided_to` answers it per node (CMA or RDMA: yes; UCX's
    TCP emulation: no), and ``self.rma_tls`` lists the transports UCX chose once open.
    """

    kind = "ucx"
    caps = (TransportCaps.NETWORK | TransportCaps.ZERO_COPY | TransportCaps.REGISTERS_MEMORY
            | TransportCaps.ONE_SIDED)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from kvpool.transport import ucp

        return ucp.availability()

    @classmethod
    def reachable(cls, endpoint: NodeEndpoint, tier: str) -> bool:
        """UCX is installed here and the node published a worker address and a registered
        region for ``tier``. Says nothing about one-sidedness (see :meth:`one_sided_to`)."""
        return (bool(endpoint.ucx_worker_address) and endpoint.ucx_region(tier) is not None
                and cls.available()[0])

    @classmethod
    def caps_to(cls, endpoint: NodeEndpoint) -> TransportCaps:
        if cls.one_sided_to(endpoint):
            return cls.caps
        return (cls.caps & ~TransportCaps.ONE_SIDED) | TransportCaps.EMULATED_RMA

    @classmethod
    def one_sided_to(cls, endpoint: NodeEndpoint) -> bool:
        """Whether UCX reaches the node's memory without its CPU: the RMA lanes UCX selects
        for an endpoint to the node's worker use a one-sided transport (CMA, RDMA), not
        TCP. Asked once per worker address (creating and dropping one local endpoint)."""
        if not endpoint.ucx_worker_address or not cls.available()[0]:
            return False
        try:
            return _Ucx.get().probe(endpoint.ucx_worker_address)[0]
        except (OSError, RuntimeError):
            return False

    @classmethod
    def open(cls, endpoint: NodeEndpoint, tier: str, options: TransportOptions) -> "UcxTransport":
        region = endpoint.ucx_region(tier)
        if not endpoint.ucx_worker_address or region is None:
            raise Unavailable(f"node {endpoint.name!r} (id {endpoint.node_id}) offers no UCX access "
                              f"to its {tier} tier (it offers {endpoint.offers() or 'nothing'})")
        ok, reason = cls.available()
        if not ok:
            raise Unavailable(reason)
        transport = cls(endpoint, tier, region, options)
        try:
            transport._connect_all()
        except BaseException:
            transport.close()
            raise
        return transport

    def __init__(self, endpoint: NodeEndpoint, tier: str, region: UcxRegion,
                 options: TransportOptions) -> None:
        self.endpoint = endpoint
        self.tier = tier
        self.region = region
        self.options = options
        self._ucx = _Ucx.get()
        self._width = max(1, int(options.connections))
        self._conns: dict[int, _Conn] = {}  # id(lane) -> connection; touched under that lane's lock
        self._registry = _Registry(self._ucx.context)
        self._broken: str | None = None
        self._closed = False
        #: The UCX transports of this endpoint's RMA lanes: ``["cma"]`` or ``["rc_mlx5"]``
        #: (one-sided); ``["tcp", ...]`` or none: RMA emulated on messages the node serves.
        self.rma_tls: list[str] = []

    # -- connections -------------------------------------------------------------------------

    def _where(self) -> str:
        return f"node {self.endpoint.name!r} (id {self.endpoint.node_id}, host {self.endpoint.host_id})"

    def _conn(self, lane: _Lane) -> _Conn:
        """This transport's endpoint on ``lane`` (whose lock the caller holds)."""
        conn = self._conns.get(id(lane))
        if conn is not None:
            return conn
        ep = lane.worker.connect(self.endpoint.ucx_worker_address, peer_errors=True,
                                 name=f"kvpool-{self.endpoint.node_id}")
        try:
            rkey = ep.unpack_rkey(self.region.rkey)
        except BaseException:
            ep.close(force=True)
            raise
        conn = _Conn(ep, rkey)
        self._conns[id(lane)] = conn
        return conn

    def _connect_all(self) -> None:
        """Connect on every worker this transport uses, and flush: the node answers (UCX
        wire-up, which needs the node's CPU once) or it is unavailable. Done at open so that
        later transfers never wait for a wire-up, which a busy node would delay."""
        ucp = self._ucx.ucp
        for lane in self._ucx.pool(self._width)[: self._width]:
            with lane.lock:
                try:
                    conn = self._conn(lane)
                    if not self.rma_tls:
                        self.rma_tls = rma_transports(conn.ep.info())
                    lane.worker.wait([conn.ep.flush()], self.options.connect_timeout, endpoint=conn.ep)
                except ucp.UcxError as exc:
                    self._fail(lane, exc)

    def _fail(self, lane: _Lane, exc: Exception) -> None:
        """A transfer failed: drop the endpoint (completing what is in flight), refuse from
        now on, and raise Unavailable naming the node."""
        ucp = self._ucx.ucp
        conn = self._conns.pop(id(lane), None)
        if conn is not None:
            conn.rkey.destroy()
            conn.ep.close(force=True)
        timed_out = isinstance(exc, ucp.UcxError) and exc.status == ucp.UCS_ERR_TIMED_OUT
        why = "no progress for the I/O timeout" if timed_out else str(exc)
        self._broken = f"UCX transfer with {self._where()} failed: {why}"
        raise Unavailable(self._broken) from exc

    @contextmanager
    def _batch(self):
        if self._closed:
            raise Unavailable(f"the ucx transport to {self._where()} is closed")
        if self._broken:
            raise Unavailable(self._broken)
        with self._ucx.lane(self._width) as lane:
            if self._closed:
                raise Unavailable(f"the ucx transport to {self._where()} is closed")
            try:
                conn = self._conn(lane)
            except self._ucx.ucp.UcxError as exc:
                self._fail(lane, exc)
            yield lane, conn

    # -- data --------------------------------------------------------------------------------

    def register(self, buffers: Sequence) -> None:
        """Map client buffers with UCX once (pinned and registered where the fabric needs it:
        RDMA); later transfers from and into them pass the memory handle. The transport keeps
        them alive until it closes: register long-lived buffers only."""
        for i, buf in enumerate(buffers):
            self._registry.add(_host_array(buf, writable=False, what=f"buffer {i}"))

    def _slots(self, share: Share, bufs: Sequence, *, writable: bool) -> list[tuple[int, int, int, int | None]]:
        """(local address, size, remote address, memh) per block, checked."""
        records = share.records
        if len(bufs) != len(records):
            raise InvalidArgument(f"{len(records)} blocks but {len(bufs)} buffers")
        out = []
        base, limit = self.region.base, self.region.size
        what = "destination" if writable else "source"
        for i, (rec, buf) in enumerate(zip(records, bufs)):
            arr = _host_array(buf, writable=writable, what=f"{what} {i}")
            off, size = int(rec["offset"]), int(rec["size"])
            if arr.nbytes != size:
                raise InvalidArgument(f"{what} {i} has {arr.nbytes} bytes, its slot {size}")
            if off + size > limit:
                raise InvalidArgument(f"slot at offset {off} (+{size}) lies outside the {self.tier} "
                                      f"arena of {self._where()} ({limit} bytes)")
            addr = arr.ctypes.data
            out.append((addr, size, base + off, self._registry.lookup(addr, size)))
        return out

    def write(self, share: Share, sources: Sequence) -> None:
        # The flush returns once every PUT has landed in the node's memory: then commit.
        self._transfer(self._slots(share, sources, writable=False), lambda conn, *a: conn.ep.put(*a), flush=True)

    def read(self, share: Share, outs: Sequence) -> None:
        self._transfer(self._slots(share, outs, writable=True), lambda conn, *a: conn.ep.get(*a), flush=False)
        self._verify(share, outs)

    def _transfer(self, slots, issue, *, flush: bool) -> None:
        """Issue one request per slot on a free lane and wait for all of them (and a flush)."""
        ucp = self._ucx.ucp
        with self._batch() as (lane, conn):
            requests = []
            try:
                for addr, size, remote, memh in slots:
                    requests.append(issue(conn, addr, size, remote, conn.rkey, memh))
                if flush:
                    requests.append(conn.ep.flush())
                pending, requests = requests, []
                lane.worker.wait(pending, self.options.io_timeout, endpoint=conn.ep)
            except ucp.UcxError as exc:
                lane.worker.abandon(requests)
                self._fail(lane, exc)

    def _verify(self, share: Share, outs: Sequence) -> None:
        import xxhash

        bad = []
        for i, (rec, out) in enumerate(zip(share.records, outs)):
            got = xxhash.xxh3_64_intdigest(_host_array(out, writable=False, what="destination"))
            if got != int(rec["checksum"]):
                bad.append(i)
        if bad:
            rec = share.records[bad[0]]
            raise BlockIntegrityError(
                f"{len(bad)} of {len(outs)} blocks read with UCX from the {self.tier} tier of {self._where()} "
                f"failed their xxh3-64 checksum (first at offset {int(rec['offset'])}); they were dropped "
                f"from the pool, not returned", bad)

    def close(self) -> None:
        """Drop the endpoints and remote keys, and unmap registered buffers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for lane in list(self._ucx.lanes):
            with lane.lock:
                conn = self._conns.pop(id(lane), None)
                if conn is not None:
                    conn.rkey.destroy()
                    conn.ep.close(force=self._broken is not None)
        self._registry.close()
