"""Zero-copy byte views of the buffers users hand the client: bytes, numpy, torch.

A block is always moved as a flat uint8 view of the caller's memory, so a put or get copies
exactly once, between that memory and the node's arena. Host memory becomes a numpy view;
a CUDA tensor (where the caller allows device memory) becomes a flat uint8 CUDA tensor,
which the transports copy with DMA.
"""

from __future__ import annotations

import sys
import numpy as np

from kvpool.errors import InvalidArgument

__all__ = ["byte_view", "block_views", "is_device"]


def is_device(view) -> bool:
    """True for a device (CUDA) block view, False for a host (numpy) one."""
    return not isinstance(view, np.ndarray)


def _torch_view(obj, allow_device: bool):
    torch = sys.modules.get("torch")  # never import torch just to check a type
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    if obj.device.type != "cpu" and not (allow_device and obj.device.type == "cuda"):
        raise InvalidArgument(f"tensor is on {obj.device}; pass host memory or a CUDA tensor")
    if not obj.is_contiguous():
        raise InvalidArgument("tensor is not contiguous; call .contiguous() first")
    flat = obj.detach().reshape(-1)
    if flat.element_size() != 1 or flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if flat.device.type == "cuda":
        return flat
    return flat.numpy().reshape(-1)


def byte_view(obj, *, writable: bool = False, allow_device: bool = False):
    """A flat uint8 view of ``obj`` sharing its memory (no copy): numpy, or a CUDA tensor."""
    view = _torch_view(obj, allow_device)
    if view is not None and is_device(view):
        return view
    if view is None:
        if isinstance(obj, np.ndarray):
            if not obj.flags.c_contiguous:
                raise InvalidArgument("numpy array is not C-contiguous; use np.ascontiguousarray")
            view = obj.reshape(-1).view(np.uint8)
        else:
            try:
                view = np.frombuffer(obj, dtype=np.uint8)
            except TypeError:
                raise InvalidArgument(
                    f"cannot use a {type(obj).__name__} as a block; pass bytes, a numpy array or a CPU tensor"
                ) from None
    if writable and not view.flags.writeable:
        raise InvalidArgument(f"output buffer ({type(obj).__name__}) is read-only; pass a bytearray, array or tensor")
    return view


def _nbytes(view) -> int:
    return view.size if isinstance(view, np.ndarray) else view.numel()


def block_views(blocks, count: int, block_bytes: int, *, writable: bool = False,
                allow_device: bool = False) -> list:
    """``count`` views of ``block_bytes`` each, from a sequence of blocks or one contiguous buffer."""
    if isinstance(blocks, (list, tuple)):
        if len(blocks) < count:
            raise InvalidArgument(f"got {len(blocks)} blocks for {count} keys; pass one block per key")
        views = [byte_view(b, writable=writable, allow_device=allow_device) for b in blocks[:count]]
    else:
        flat = byte_view(blocks, writable=writable, allow_device=allow_device)
        if _nbytes(flat) < count * block_bytes:
            raise InvalidArgument(
                f"buffer of {_nbytes(flat)} bytes is too small for {count} blocks of {block_bytes} bytes"
            )
        views = list(flat[: count * block_bytes].reshape(count, block_bytes))
    for i, v in enumerate(views):
        if _nbytes(v) != block_bytes:
            raise InvalidArgument(
                f"block {i} has {_nbytes(v)} bytes but this namespace's layout makes blocks of {block_bytes} bytes"
            )
    return views

