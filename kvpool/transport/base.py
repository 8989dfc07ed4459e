"""The data plane: how a client moves block bytes to and from a node, never via the master.

A :class:`Transport` reaches one tier of one node. It is opened for a
:class:`~kvpool.transport.endpoint.NodeEndpoint` (what the master says about the node), keeps
whatever connection state it needs (a shared-memory mapping, sockets, a UCX endpoint and
unpacked remote keys), and is closed by the :class:`TransportFactory` when the node is gone
or the client closes.

Choosing a transport is a matter of capability flags, never of names: every transport class
declares :class:`TransportCaps` and answers :meth:`Transport.reachable` for an endpoint; the
factory takes the best-ranked reachable one (same-host zero-copy first, then one-sided
network access, then two-sided network access). A user may force one by its ``kind``
(``transport="tcp"``), for tests and for people who know their network.

Protocol of one batch, as a :class:`Share` (the blocks of one node and tier):

* put: ``write(share, sources)`` copies each source into its granted slot. The client
  commits only after every write of the batch returned.
* get: ``read(share, outs)`` copies each slot into its destination while the client holds
  the read lease that pins those slots.

A share carries the :class:`Access` the master signed for that node: a capability (an HMAC
under a key the master and the node share) over the exact slot records of the grant or lease.
Network transports send it with every request and the node checks it before touching a slot;
same-host transports, which map the arena directly, do not need it.

Sources and destinations are flat uint8 views: numpy arrays for host memory, or CUDA
tensors where the transport declares ``DEVICE_BUFFERS``. A transport returns only when its
copies are complete (device copies and remote flushes included), so a commit never races a
copy. Transports whose bytes cross a network (``NETWORK``) verify each block's xxh3-64
checksum on read and raise :class:`~kvpool.errors.IntegrityError` on a mismatch, never
handing wrong bytes back as good ones.

Memory registration is explicit: :meth:`Transport.register` is called with the client's
buffers before they are used, so an RDMA transport can pin and register them once. Transports
that need nothing there inherit the no-op.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from kvpool.errors import IntegrityError, Unavailable
from kvpool.transport.endpoint import NodeEndpoint

__all__ = ["Access", "BlockIntegrityError", "Share", "Transport", "TransportCaps", "TransportFactory", "TransportOptions", "READ", "WRITE"]

#: Operations an :class:`Access` allows.
READ, WRITE = 1, 2


class TransportCaps(enum.Flag):
    NONE = 0
    #: Copies land directly in the node's memory or the caller's (no intermediate buffer).
    ZERO_COPY = enum.auto()
    #: Works only when client and node share a host.
    SAME_HOST = enum.auto()
    #: Bytes cross a network, so reads verify checksums.
    NETWORK = enum.auto()
    #: Accepts CUDA tensors as sources and destinations (DMA, no host staging by the caller).
    DEVICE_BUFFERS = enum.auto()
    #: The node's CPU takes no part in a transfer (RDMA, or CMA on one host).
    ONE_SIDED = enum.auto()
    #: Needs :meth:`Transport.register` of the client's buffers to reach full speed.
    REGISTERS_MEMORY = enum.auto()
    #: A one-sided API that the node's CPU serves over a stream (UCX RMA over TCP): it works,
    #: and measures slower than a transport built for the stream (tools/bench_throughput.py).
    EMULATED_RMA = enum.auto()


def rank(caps: TransportCaps) -> int:
    """Preference among reachable transports, lower first: same-host mapping, one-sided
    network access, a native two-sided protocol, then one-sided access emulated by the node."""
    if TransportCaps.SAME_HOST in caps:
        return 0
    if TransportCaps.ONE_SIDED in caps:
        return 1
    if TransportCaps.EMULATED_RMA in caps:
        return 3
    return 2


@dataclass(frozen=True)
class Access:
    """What the master allowed on one node: ``op`` (READ or WRITE) on the slots in ``records``.

    ``records`` are the node's 32-byte location records (kvpool.wire.RECORD) of the grant or
    lease, exactly as the master signed them; ``mac`` is the HMAC that proves it (see
    :mod:`kvpool.capability`). ``expires_unix_ms`` is wall-clock time on the node.
    """

    op: int
    grant_id: str
    node_id: int
    expires_unix_ms: int
    mac: bytes
    records: bytes
    #: The tenant whose blocks these are (signed with the rest).
    tenant: str = ""


@dataclass
class Share:
    """Blocks of one batch that live on one node and tier, moved by one call.

    ``records`` are the blocks (kvpool.wire.RECORD_DTYPE), ``positions`` their index in
    ``access.records`` (the capability covers the whole list; a request names a subset).
    """

    records: np.ndarray
    positions: np.ndarray
    access: Access | None = None


class BlockIntegrityError(IntegrityError):
    """Blocks read over a network failed their xxh3-64 checksum. ``positions`` index the
    share's records; the client reports those blocks to the master, which drops them."""

    def __init__(self, message: str, positions: list[int]) -> None:
        super().__init__(message)
        self.positions = positions


@dataclass(frozen=True)
class TransportOptions:
    """Client-side settings every transport may read."""

    #: Seconds to wait for a connection to a node before declaring it unavailable.
    connect_timeout: float = 3.0
    #: Seconds a transfer may stall (no bytes moving) before the node is declared unavailable.
    io_timeout: float = 10.0
    #: Connections (or equivalent) per node: one per concurrent share.
    connections: int = 2
    #: Client-side ``ssl.SSLContext`` for nodes whose data port speaks TLS (kvpool.tls).
    tls: object = None


class Transport(ABC):
    #: Short name a user can force (``transport="tcp"``); shown in errors and logs.
    kind: str = ""
    caps: TransportCaps = TransportCaps.NONE

    @classmethod
    @abstractmethod
    def reachable(cls, endpoint: NodeEndpoint, tier: str) -> bool:
        """Whether this client can reach ``tier`` of the node described by ``endpoint``."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this process can use the transport at all (an optional library, say)."""
        return True, ""

    @classmethod
    def caps_to(cls, endpoint: NodeEndpoint) -> TransportCaps:
        """The capabilities this transport has towards one node (for ranking). Most have the
        same towards every node; one whose fabric decides (UCX) answers per node."""
        return cls.caps

    @classmethod
    @abstractmethod
    def open(cls, endpoint: NodeEndpoint, tier: str, options: TransportOptions) -> "Transport":
        """Open the transport to ``tier`` of a node (map, connect, unpack keys)."""

    def register(self, buffers: Sequence) -> None:
        """Register client buffers for the data plane before they are used (no-op by default)."""

    @abstractmethod
    def write(self, share: Share, sources: Sequence) -> list[int] | None:
        """Copy ``sources[i]`` into the slot of ``share.records[i]``. A transport that hashed
        the blocks on the way (a network transport sends the sums along) returns their
        xxh3-64 checksums; others return None and the client hashes."""

    @abstractmethod
    def read(self, share: Share, outs: Sequence) -> None:
        """Copy the slot of ``share.records[i]`` into ``outs[i]``."""

    def host_view(self, record) -> np.ndarray | None:
        """The slot's bytes as host memory the client can read (for checksums), if any."""
        return None

    def close(self) -> None:
        pass


@dataclass
class _Open:
    transport: Transport
    last_used: float = field(default_factory=time.monotonic)


class TransportFactory:
    """Opens transports for node endpoints, keeps them per node, and closes them.

    ``classes`` are the transports this client speaks. ``force`` names one ``kind`` to use
    for every node (raising if it cannot reach a node). Transports of a node are dropped
    when the caller says the node is gone (:meth:`drop_node`, after a transfer failed) and
    when unused for ``idle_s`` seconds, so a client never accumulates state for nodes that
    left the pool. Thread-safe: copy threads share it.
    """

    def __init__(self, classes: Iterable[type[Transport]], *, force: str | None = None,
                 options: TransportOptions | None = None, idle_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.classes = list(classes)
        self.force = force or None
        self.options = options or TransportOptions()
        self.idle_s = idle_s
        self._clock = clock
        self._open: dict[tuple[int, str], _Open] = {}
        self._buffers: list = []
        self._swept = clock()
        self._lock = threading.Lock()
        if self.force is not None and self.force not in {c.kind for c in self.classes}:
            raise ValueError(f"unknown transport {self.force!r}; this client speaks "
                             f"{sorted(c.kind for c in self.classes)}")

    def candidates(self, endpoint: NodeEndpoint, tier: str) -> list[type[Transport]]:
        """Transports that can reach ``tier`` of the node, best first."""
        # reachable() reads only the endpoint; available() may import torch or load libucp
        # (seconds on a cold process), so it runs only for a transport that could be used.
        usable = [c for c in self.classes if (self.force is None or c.kind == self.force)
                  and c.reachable(endpoint, tier) and c.available()[0]]
        return sorted(usable, key=lambda c: rank(c.caps_to(endpoint)))

    def get(self, endpoint: NodeEndpoint, tier: str) -> Transport:
        """The open transport to ``tier`` of the node, opening the best one if needed."""
        if self._clock() - self._swept > self.idle_s / 4:
            self.drop_idle()
        key = (endpoint.node_id, tier)
        with self._lock:
            held = self._open.get(key)
            if held is not None:
                held.last_used = self._clock()
                return held.transport
        errors = []
        for cls in self.candidates(endpoint, tier):
            try:
                transport = cls.open(endpoint, tier, self.options)
            except (OSError, RuntimeError, Unavailable) as exc:
                errors.append(f"{cls.kind}: {exc}")
                continue
            with self._lock:
                held = self._open.setdefault(key, _Open(transport, self._clock()))
                buffers = list(self._buffers)
            if held.transport is not transport:  # another thread opened one meanwhile
                transport.close()
            elif buffers and TransportCaps.REGISTERS_MEMORY in transport.caps:
                transport.register(buffers)
            return held.transport
        why = "; ".join(errors) if errors else self._why_unreachable(endpoint, tier)
        exc = Unavailable(f"no data transport reaches the {tier} tier of node {endpoint.name!r} "
                          f"(id {endpoint.node_id}, host {endpoint.host_id}): {why}")
        exc.node_ids = [endpoint.node_id]
        raise exc

    def _why_unreachable(self, endpoint: NodeEndpoint, tier: str) -> str:
        offered = ", ".join(endpoint.offers())
        notes = []
        for cls in self.classes:
            if self.force is not None and cls.kind != self.force:
                continue
            ok, reason = cls.available()
            notes.append(f"{cls.kind}: {reason}" if not ok else f"{cls.kind}: not reachable")
        forced = f" (transport forced to {self.force!r})" if self.force else ""
        return (f"the node offers {offered or 'nothing'} for {tier}, this client tried {', '.join(notes)}{forced}; "
                f"shared memory and CUDA IPC need the client on the node's host, and network transports "
                f"need the node's data server (kvpool node --data-port)")

    def register(self, buffers: Sequence) -> None:
        """Register client buffers with every transport that wants it, now and when opened."""
        with self._lock:
            self._buffers.extend(buffers)
            held = [h.transport for h in self._open.values()]
        for t in held:
            if TransportCaps.REGISTERS_MEMORY in t.caps:
                t.register(buffers)

    def drop_node(self, node_id: int) -> None:
        """Close every transport to a node (it failed, or left the pool)."""
        with self._lock:
            gone = [k for k in self._open if k[0] == node_id]
            held = [self._open.pop(k) for k in gone]
        for h in held:
            h.transport.close()

    def drop_idle(self) -> None:
        """Close transports unused for ``idle_s`` seconds."""
        self._swept = self._clock()
        cutoff = self._swept - self.idle_s
        with self._lock:
            idle = [k for k, h in self._open.items() if h.last_used < cutoff]
            held = [self._open.pop(k) for k in idle]
        for h in held:
            h.transport.close()

    def open_kinds(self) -> dict[int, str]:
        """Node id -> kind of the transport in use (for tests and diagnostics)."""
        with self._lock:
            return {k[0]: h.transport.kind for k, h in self._open.items()}

    def close(self) -> None:
        with self._lock:
            held = list(self._open.values())
            self._open.clear()
        for h in held:
            h.transport.close()
