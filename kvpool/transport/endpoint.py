"""How a client reaches one node: :class:`NodeEndpoint`, the one Python type for the
``NodeEndpoint`` message of common.proto (converted only in :mod:`kvpool.wire`).

A node describes itself once, when it registers; the master adds the node id and hands the
endpoint to clients with every location batch. Each transport reads only its own part:

* ``segments``: memory a client on the same host can map (POSIX shm, a CUDA IPC handle);
* ``tcp_address``: the node's data server (``host:port``), for any host;
* ``ucx_worker_address`` and ``ucx_regions``: one-sided UCX access to registered arenas.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["NodeEndpoint", "SharedSegment", "UcxRegion"]


@dataclass(frozen=True)
class SharedSegment:
    """A tier's memory that same-host clients map: ``kind`` "shm" (``handle`` is the segment
    name in /dev/shm) or "cuda_ipc" (``handle`` is the exported IPC handle, as JSON)."""

    tier: str
    kind: str
    handle: str
    size: int


@dataclass(frozen=True)
class UcxRegion:
    """A tier's arena registered with UCX: its base address in the node's process, its
    size, and the packed remote key a client unpacks to GET and PUT there."""

    tier: str
    base: int
    size: int
    rkey: bytes


@dataclass(frozen=True)
class NodeEndpoint:
    node_id: int
    name: str
    #: Identifies host and boot (hostname/boot id): equal ids share /dev/shm.
    host_id: str
    segments: tuple[SharedSegment, ...] = ()
    tcp_address: str = ""
    ucx_worker_address: bytes = b""
    ucx_regions: tuple[UcxRegion, ...] = ()
    #: The data server at ``tcp_address`` speaks TLS only.
    tcp_tls: bool = False

    def segment(self, tier: str, kind: str) -> SharedSegment | None:
        for s in self.segments:
            if s.tier == tier and s.kind == kind:
                return s
        return None

    def ucx_region(self, tier: str) -> UcxRegion | None:
        for r in self.ucx_regions:
            if r.tier == tier:
                return r
        return None

    def with_id(self, node_id: int) -> "NodeEndpoint":
        return dataclasses.replace(self, node_id=node_id)

    def offers(self) -> list[str]:
        """What the node offers, for messages: ``["shm.dram", "tcp", "ucx.dram"]``."""
        out = [f"{s.kind}.{s.tier}" for s in self.segments]
        if self.tcp_address:
            out.append(f"tcp {self.tcp_address}")
        out.extend(f"ucx.{r.tier}" for r in self.ucx_regions)
        return out

    # The NodeEndpoint message of common.proto. Filled and read by attribute, so that this
    # module (and every transport) stays free of the generated stubs.

    def fill(self, msg) -> None:
        """Write this endpoint into a ``kvpool.v1.NodeEndpoint`` message."""
        msg.node_id, msg.name, msg.host_id, msg.tcp_address = self.node_id, self.name, self.host_id, self.tcp_address
        msg.tcp_tls = self.tcp_tls
        for s in self.segments:
            msg.segments.add(tier=s.tier, kind=s.kind, handle=s.handle, size=s.size)
        if self.ucx_worker_address:
            msg.ucx.worker_address = self.ucx_worker_address
            for r in self.ucx_regions:
                msg.ucx.regions.add(tier=r.tier, base=r.base, size=r.size, rkey=r.rkey)

    @classmethod
    def from_proto(cls, msg) -> "NodeEndpoint":
        return cls(
            node_id=msg.node_id, name=msg.name, host_id=msg.host_id, tcp_address=msg.tcp_address, tcp_tls=msg.tcp_tls,
            segments=tuple(SharedSegment(s.tier, s.kind, s.handle, s.size) for s in msg.segments),
            ucx_worker_address=bytes(msg.ucx.worker_address),
            ucx_regions=tuple(UcxRegion(r.tier, r.base, r.size, bytes(r.rkey)) for r in msg.ucx.regions),
        )
