"""Same-host GPU data plane: the client maps the node's HBM arena through CUDA IPC.

The node exports one CUDA IPC handle for its HBM arena (in its endpoint, as JSON). A client
on the same host opens it once and then copies blocks device-to-device (or host-to-device)
straight into and out of the arena's slots: the node's process never touches the bytes.

Copies run on the calling thread's current CUDA stream and are synchronized before a call
returns, so the client commits only blocks whose bytes have landed.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from kvpool.transport.base import Share, Transport, TransportCaps, TransportOptions
from kvpool.transport.endpoint import NodeEndpoint
from kvpool.transport.shm import host_id

__all__ = ["CudaIpcTransport"]


class CudaIpcTransport(Transport):
    kind = "cuda_ipc"
    caps = TransportCaps.ZERO_COPY | TransportCaps.SAME_HOST | TransportCaps.DEVICE_BUFFERS

    def __init__(self, handle_json: str, size: int) -> None:
        from kvpool.tiers.hbm import HbmIpcHandle, open_hbm_ipc

        self._arena = open_hbm_ipc(HbmIpcHandle.from_dict(json.loads(handle_json)))
        if self._arena.numel() < size:
            raise ValueError(f"HBM arena mapping has {self._arena.numel()} bytes, expected {size}")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from kvpool.tiers.hbm import HbmArena

        return HbmArena.available()

    @classmethod
    def reachable(cls, endpoint: NodeEndpoint, tier: str) -> bool:
        return endpoint.segment(tier, cls.kind) is not None and endpoint.host_id == host_id()

    @classmethod
    def open(cls, endpoint: NodeEndpoint, tier: str, options: TransportOptions) -> "CudaIpcTransport":
        seg = endpoint.segment(tier, cls.kind)
        return cls(seg.handle, seg.size)

    def _slot(self, rec):
        off = int(rec["offset"])
        return self._arena[off : off + int(rec["size"])]

    @staticmethod
    def _as_tensor(buf):
        if isinstance(buf, np.ndarray):
            import torch

            return torch.from_numpy(buf)
        return buf

    def write(self, share: Share, sources: Sequence) -> None:
        import torch

        for rec, src in zip(share.records, sources):
            self._slot(rec).copy_(self._as_tensor(src), non_blocking=True)
        torch.cuda.current_stream().synchronize()

    def read(self, share: Share, outs: Sequence) -> None:
        import torch

        for rec, dst in zip(share.records, outs):
            self._as_tensor(dst).copy_(self._slot(rec), non_blocking=True)
        torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        self._arena = None
