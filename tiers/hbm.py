"""HBM tier: a slot arena in one GPU allocation, mapped by co-located engines via CUDA IPC.

The node allocates the whole tier up front as a single device buffer (a torch uint8 tensor)
and cuts it into fixed-size slots with the shared :class:`SlabAllocator`, exactly like DRAM.
An engine on the same host opens the buffer in its own process from an
:class:`HbmIpcHandle` (:func:`open_hbm_ipc`) and gathers or scatters blocks straight into its
slots with the kvpool kernels: no block ever crosses the PCIe bus on a same-GPU hit.

The tier exists only where CUDA does. :meth:`HbmArena.available` says whether it can be built
and why not; constructing it without CUDA raises :class:`HbmUnavailableError`. Nothing else in
the node changes when it is absent: tiers are found by their caps, never by name.

Invariants:

* The node process owns the allocation. It must outlive every process that opened the
  handle; torch's CUDA IPC reference counter delays the real free until they let go.
* A handle names the allocation of one device. The opener must see the same GPU (the same
  physical device under its ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import base64
import importlib.util
import warnings
from dataclasses import asdict, dataclass

from kvpool.tiers.base import Arena, Slot, TierCaps

__all__ = ["HbmArena", "HbmIpcHandle", "HbmUnavailableError", "open_hbm_ipc"]


class HbmUnavailableError(RuntimeError):
    """The HBM tier was asked for on a host (or torch build) without CUDA."""


def _availability() -> tuple[bool, str]:
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed (pip install 'kvpool[gpu]' with a CUDA torch)"
    import torch

    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # a broken driver reads as unavailable, with its reason
        return False, f"CUDA could not be initialized: {exc}"
    if count == 0 and torch.version.cuda is None and torch.version.hip is None:
        return False, f"torch {torch.__version__} is a CPU-only build (no CUDA support)"
    if count == 0:
        return False, "torch has CUDA support but no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)"
    return True, f"{count} CUDA device(s), e.g. {torch.cuda.get_device_name(0)}"


def _b64(value):
    return None if value is None else base64.b64encode(bytes(value)).decode("ascii")


def _unb64(value):
    return None if value is None else base64.b64decode(value)


@dataclass(frozen=True)
class HbmIpcHandle:
    """What another process needs to map an HBM arena: plain values, JSON-safe via to_dict.

    ``cuda_ipc_handle`` is the raw ``cudaIpcMemHandle_t`` of the allocation that holds the
    arena and ``storage_offset_bytes`` where the arena starts in it, so a non-torch engine can
    call ``cudaIpcOpenMemHandle`` itself. The remaining fields let torch rebuild the tensor
    with its IPC reference counting (:func:`open_hbm_ipc`).
    """

    device_index: int
    capacity: int
    cuda_ipc_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    tensor_offset: int
    ref_counter_handle: bytes | None
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("cuda_ipc_handle", "ref_counter_handle", "event_handle"):
            d[key] = _b64(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HbmIpcHandle":
        d = dict(d)
        for key in ("cuda_ipc_handle", "ref_counter_handle", "event_handle"):
            d[key] = _unb64(d[key])
        return cls(**d)


def open_hbm_ipc(handle: HbmIpcHandle):
    """Map an HBM arena exported by another process: a uint8 CUDA tensor of ``capacity`` bytes.

    Call it in the consumer process (never in the exporter: CUDA refuses to open a handle in
    the process that made it). Keep the returned tensor for as long as the mapping is used.
    """
    ok, reason = _availability()
    if not ok:
        raise HbmUnavailableError(f"cannot open an HBM arena handle: {reason}")
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size([handle.capacity]), (1,), handle.tensor_offset,
        torch.storage.TypedStorage, torch.uint8, handle.device_index, handle.cuda_ipc_handle,
        handle.storage_size_bytes, handle.storage_offset_bytes, False,
        handle.ref_counter_handle, handle.ref_counter_offset, handle.event_handle,
        handle.event_sync_required,
    )


class HbmArena(Arena):
    """Slots in one device allocation, shared with co-located engines through CUDA IPC."""

    name = "hbm"
    caps = TierCaps.DEVICE | TierCaps.CUDA_IPC

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, what was found) where CUDA is usable, else (False, why not). Never raises."""
        return _availability()

    def __init__(self, capacity: int, *, chunk_bytes: int = 64 << 20, device=None) -> None:
        ok, reason = _availability()
        if not ok:
            raise HbmUnavailableError(
                f"the HBM tier needs CUDA, and {reason}; run the node without an HBM tier "
                f"(DRAM and NVMe work without a GPU)"
            )
        import torch

        super().__init__(capacity, chunk_bytes)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None \
            else torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"HbmArena needs a CUDA device, got {self.device}")
        try:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        except torch.cuda.OutOfMemoryError as exc:
            free, total = torch.cuda.mem_get_info(self.device)
            raise MemoryError(
                f"HBM tier of {self.capacity} bytes does not fit on {self.device} "
                f"({free} of {total} bytes free); lower the HBM tier size"
            ) from exc

    # -- byte movement ---------------------------------------------------------------------

    def slot_tensor(self, slot: Slot):
        """A uint8 device view of the slot (no copy): a target for the gather/scatter kernels."""
        if slot.offset < 0 or slot.offset + slot.size > self.capacity:
            raise ValueError(f"{slot} lies outside the {self.capacity}-byte arena")
        return self.buffer[slot.offset : slot.offset + slot.size]

    @staticmethod
    def _as_bytes_tensor(data, *, writable: bool):
        """Any buffer or tensor as a flat uint8 tensor sharing its memory."""
        import numpy as np
        import torch

        if isinstance(data, torch.Tensor):
            if not data.is_contiguous():
                raise ValueError("HBM copies need a contiguous tensor")
            return data.reshape(-1).view(torch.uint8)
        arr = np.frombuffer(data, dtype=np.uint8)
        if writable and not arr.flags.writeable:
            raise ValueError("read_into needs a writable buffer")
        with warnings.catch_warnings():
            # torch warns about read-only buffers; a write() source is only ever read.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)

    def write(self, slot: Slot, data) -> None:
        """Copy ``data`` (host buffer, or a tensor on any device) into the slot.

        Host sources are copied synchronously (pinned ones by DMA); a device source is
        ordered on the current stream, like any torch copy.
        """
        src = self._as_bytes_tensor(data, writable=False)
        if src.numel() != slot.size:
            raise ValueError(f"write of {src.numel()} bytes into a slot of {slot.size}")
        self.slot_tensor(slot).copy_(src)

    def read_into(self, slot: Slot, out) -> None:
        """Copy the slot into ``out`` (writable host buffer, or a tensor on any device)."""
        dst = self._as_bytes_tensor(out, writable=True)
        if dst.numel() != slot.size:
            raise ValueError(f"read_into a buffer of {dst.numel()} bytes from a slot of {slot.size}")
        dst.copy_(self.slot_tensor(slot))  # blocking: host memory is complete on return

    # -- sharing -------------------------------------------------------------------------------

    def ipc_handle(self) -> HbmIpcHandle:
        """Export the arena for a co-located process (see :func:`open_hbm_ipc`)."""
        from torch.multiprocessing.reductions import reduce_tensor

        _, args = reduce_tensor(self.buffer)
        (_, size, _, tensor_offset, _, _, device, handle, storage_size, storage_offset, _,
         ref_handle, ref_offset, event_handle, event_sync) = args
        return HbmIpcHandle(
            device_index=int(device), capacity=int(size[0]), cuda_ipc_handle=bytes(handle),
            storage_size_bytes=int(storage_size), storage_offset_bytes=int(storage_offset),
            tensor_offset=int(tensor_offset),
            ref_counter_handle=None if ref_handle is None else bytes(ref_handle),
            ref_counter_offset=int(ref_offset),
            event_handle=None if event_handle is None else bytes(event_handle),
            event_sync_required=bool(event_sync),
        )

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "capacity": str(self.capacity)}

    def close(self) -> None:
        self.buffer = None  # the caching allocator frees it once IPC openers let go
