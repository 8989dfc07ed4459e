"""Same-host data plane: the client maps the node's DRAM arena (POSIX shm) and copies itself.

The node never touches the bytes of a same-host put or get: the client copies from its own
buffer straight into the arena slot and back. That is the one copy a put or get needs.

CUDA tensors are copied with DMA: on first use, this process registers its mapping of the
arena as pinned memory (cudaHostRegister), and copies run on the current CUDA stream of
the calling thread (a copy thread, never the event loop), synchronized before returning.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from typing import Sequence

import numpy as np

from kvpool.tiers.dram import SHM_DIR, map_shared_arena
from kvpool.transport.base import Share, Transport, TransportCaps, TransportOptions
from kvpool.transport.endpoint import NodeEndpoint

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
    kind = "shm"
    caps = TransportCaps.ZERO_COPY | TransportCaps.SAME_HOST | TransportCaps.DEVICE_BUFFERS

    def __init__(self, segment_name: str, size: int) -> None:
        self.segment = map_shared_arena(segment_name, size)
        self._arena = self.segment.array
        self._pinned = None
        self._pin_lock = threading.Lock()

    @classmethod
    def reachable(cls, endpoint: NodeEndpoint, tier: str) -> bool:
        # The arena is created mode 0600: only processes of the node's OS user may map it,
        # and the others use a data plane that checks each request (README: Running kvpool
        # securely). Asking here keeps them off a path that would only fail.
        seg = endpoint.segment(tier, cls.kind)
        return (seg is not None and endpoint.host_id == host_id()
                and os.access(os.path.join(SHM_DIR, seg.handle), os.R_OK | os.W_OK))

    @classmethod
    def open(cls, endpoint: NodeEndpoint, tier: str, options: TransportOptions) -> "ShmTransport":
        seg = endpoint.segment(tier, cls.kind)
        return cls(seg.handle, seg.size)

    def _pin(self) -> None:
        with self._pin_lock:
            if self._pinned is None:
                from kvpool.tiers.pinning import register_pinned

                # False (not None) marks "tried": an unpinned arena still works, only slower.
                self._pinned = register_pinned(self._arena) or False

    def _device_copy(self, pairs) -> None:
        import torch

        self._pin()
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        torch.cuda.current_stream().synchronize()

    def _slot(self, rec) -> np.ndarray:
        off = int(rec["offset"])
        return self._arena[off : off + int(rec["size"])]

    def host_view(self, record) -> np.ndarray:
        return self._slot(record)

    def write(self, share: Share, sources: Sequence) -> None:
        device = []
        for rec, src in zip(share.records, sources):
            if isinstance(src, np.ndarray):
                np.copyto(self._slot(rec), src)
            else:
                device.append((rec, src))
        if device:
            import torch

            self._device_copy([(torch.from_numpy(self._slot(rec)), src) for rec, src in device])

    def read(self, share: Share, outs: Sequence) -> None:
        device = []
        for rec, dst in zip(share.records, outs):
            if isinstance(dst, np.ndarray):
                np.copyto(dst, self._slot(rec))
            else:
                device.append((rec, dst))
        if device:
            import torch

            self._device_copy([(dst, torch.from_numpy(self._slot(rec))) for rec, dst in device])

    def close(self) -> None:
        if self._pinned:
            from kvpool.tiers.pinning import unregister_pinned

            unregister_pinned(self._pinned)
        self._pinned = None
        self._arena = None
        self.segment.close()
