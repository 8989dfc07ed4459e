"""Zero-copy byte views of the buffers users hand the client: bytes, numpy, CPU torch.

A block is always moved as a flat uint8 view of the caller's memory, so a put or get copies
exactly once, between that memory and the node's arena.
"""

from __future__ import annotations

import sys
import numpy as np

from kvpool.errors import InvalidArgument

__all__ = ["byte_view", "block_views"]


def _torch_view(obj, writable: bool) -> np.ndarray | None:
    torch = sys.modules.get("torch")  # never import torch just to check a type
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    if obj.device.type != "cpu":
        raise InvalidArgument(
            f"tensor is on {obj.device}; the block API takes host memory (use the GPU path, or .cpu())"
        )
    if not obj.is_contiguous():
        raise InvalidArgument("tensor is not contiguous; call .contiguous() first")
    flat = obj.reshape(-1)
    if flat.element_size() != 1:
        flat = flat.view(torch.uint8)
    return flat.detach().numpy().view(np.uint8).reshape(-1)


def byte_view(obj, *, writable: bool = False) -> np.ndarray:
    """A flat uint8 numpy view of ``obj`` sharing its memory (no copy)."""
    view = _torch_view(obj, writable)
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


def block_views(blocks, count: int, block_bytes: int, *, writable: bool = False) -> list[np.ndarray]:
    """``count`` views of ``block_bytes`` each, from a sequence of blocks or one contiguous buffer."""
    if isinstance(blocks, (list, tuple)):
        if len(blocks) < count:
            raise InvalidArgument(f"got {len(blocks)} blocks for {count} keys; pass one block per key")
        views = [byte_view(b, writable=writable) for b in blocks[:count]]
    else:
        flat = byte_view(blocks, writable=writable)
        if flat.size < count * block_bytes:
            raise InvalidArgument(
                f"buffer of {flat.size} bytes is too small for {count} blocks of {block_bytes} bytes"
            )
        views = list(flat[: count * block_bytes].reshape(count, block_bytes))
    for i, v in enumerate(views):
        if v.size != block_bytes:
            raise InvalidArgument(
                f"block {i} has {v.size} bytes but this namespace's layout makes blocks of {block_bytes} bytes"
            )
    return views

