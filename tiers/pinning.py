"""Pinned host memory: register an existing host mapping (the DRAM arena) with CUDA.

``cudaHostRegister`` page-locks memory that someone else allocated, here the node's POSIX
shared-memory segment, so copies between it and the GPU are DMA on a CUDA stream instead of
bouncing through a staging buffer and blocking the calling thread.

torch is imported only when it is installed, and CUDA is touched only when
``torch.cuda.is_available()``. Without CUDA every call is a cheap no-op that returns None, so
a CPU-only node runs the same code path.

Invariant: a :class:`PinnedRegion` does not keep the mapping alive. The owner (the arena)
unregisters before it unmaps; unmapping registered memory first is a bug on the owner's side.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

__all__ = ["PinnedRegion", "cuda_available", "register_pinned", "unregister_pinned"]

log = logging.getLogger(__name__)

#: cudaHostRegisterPortable: the pages count as pinned in every CUDA context of the process.
_CUDA_HOST_REGISTER_PORTABLE = 0x01


@dataclass(frozen=True)
class PinnedRegion:
    """A registered host range: what ``unregister_pinned`` needs, nothing that owns memory."""

    ptr: int
    nbytes: int


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device. Never raises."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install reads as "no CUDA", not a crash
        return False


def _host_range(array) -> tuple[int, int]:
    import numpy as np

    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError("register_pinned takes a 1-D numpy uint8 array (an arena's mapping)")
    if not array.flags.c_contiguous:
        raise ValueError("register_pinned needs a contiguous array")
    return int(array.ctypes.data), int(array.nbytes)


def register_pinned(array) -> PinnedRegion | None:
    """Page-lock ``array``'s memory for DMA. Returns a handle, or None when it is not pinned.

    None means: no CUDA here (the normal CPU-only case), an empty array, or a registration
    that CUDA refused (logged with the reason; the arena keeps working, only slower).
    """
    ptr, nbytes = _host_range(array)
    if nbytes == 0 or not cuda_available():
        return None
    import torch

    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE)
    if int(err) != 0:
        log.warning(
            "cudaHostRegister of %d bytes failed (cudaError %d); the DRAM tier stays "
            "unpinned and GPU copies will be staged. Check `ulimit -l` (locked memory) and "
            "that the segment is not registered twice.", nbytes, int(err),
        )
        return None
    return PinnedRegion(ptr, nbytes)


def unregister_pinned(handle: PinnedRegion | None) -> None:
    """Undo :func:`register_pinned`. None is accepted and ignored."""
    if handle is None:
        return
    if not isinstance(handle, PinnedRegion):
        raise ValueError(f"unregister_pinned takes a PinnedRegion, got {type(handle).__name__}")
    import torch

    err = torch.cuda.cudart().cudaHostUnregister(handle.ptr)
    if int(err) != 0:
        log.warning("cudaHostUnregister of %d bytes at %#x failed (cudaError %d)",
                    handle.nbytes, handle.ptr, int(err))
