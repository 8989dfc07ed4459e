"""Same-host data plane: the client maps the node's DRAM arena (POSIX shm) and copies itself.

The node never touches the bytes of a same-host put or get: the client copies from its own
buffer straight into the arena slot and back. That is the one copy a put or get needs.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from typing import Sequence

import numpy as np

from kvpool.tiers.dram import SHM_DIR, map_shared_arena
from kvpool.transport.base import Transport, TransportCaps

__all__ = ["ShmTransport", "host_id"]


@lru_cache(maxsize=1)
def host_id() -> str:
    """Identifies this host and boot: processes with equal ids share /dev/shm."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


class ShmTransport(Transport):
    name = "shm.dram"
    caps = TransportCaps.ZERO_COPY | TransportCaps.SAME_HOST

    def __init__(self, segment_name: str, size: int) -> None:
        self.segment = map_shared_arena(segment_name, size)
        self._arena = self.segment.array

    @classmethod
    def reachable(cls, endpoint: dict) -> bool:
        name = endpoint.get("transports", {}).get(cls.name)
        return bool(name) and endpoint.get("host_id") == host_id() and os.path.exists(os.path.join(SHM_DIR, name))

    def write(self, records: np.ndarray, sources: Sequence[np.ndarray]) -> None:
        arena = self._arena
        for rec, src in zip(records, sources):
            off = int(rec["offset"])
            np.copyto(arena[off : off + int(rec["size"])], src)

    def read(self, records: np.ndarray, outs: Sequence[np.ndarray]) -> None:
        arena = self._arena
        for rec, dst in zip(records, outs):
            off = int(rec["offset"])
            np.copyto(dst, arena[off : off + int(rec["size"])])

    def close(self) -> None:
        self._arena = None
        self.segment.close()
