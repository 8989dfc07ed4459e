"""PagedBlockMover: copies whole blocks between an engine's paged KV cache and pool-layout buffers.

An engine hands over one KV cache tensor per layer, in its own layout; the pool stores each
block as :class:`kvpool.layout.KVLayout` says (layers x planes x tokens x heads x dim). The
mover recognises the engine layout from the tensors themselves, binds them once, and moves
blocks with :mod:`kvpool.kernels.paged_copy`: the Triton kernels where the cache is on a GPU
and each (block, layer, plane) chunk is contiguous, the torch references otherwise (the CPU
backend's head-major layout is neither). It imports no engine, so the copy path an adapter
runs can be tested, on a GPU or not, without the engine installed.

Layouts recognised (per layer; ``h`` KV heads, ``d`` head size, ``bs`` block size):
flash-attention ``[2, blocks, bs, h, d]``, FlashInfer ``[blocks, 2, bs, h, d]``, vLLM's CPU
backend ``[blocks, h, bs, 2 * d]`` (K rows then V rows of each head), MLA ``[blocks, bs, d]``.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from kvpool.kernels.paged_copy import gather_blocks, gather_blocks_ref, scatter_blocks, scatter_blocks_ref
from kvpool.kernels.paged_layout import PagedCacheLayout
from kvpool.layout import KVLayout

__all__ = ["PagedBlockMover", "paged_layout_from_tensors"]


def _layer_index(name: str) -> tuple[int, str]:
    m = re.search(r"\d+", name)
    return (int(m.group()) if m else -1, name)


def paged_layout_from_tensors(layer: torch.Tensor, pool: KVLayout, num_layers: int):
    """Recognise the engine cache layout of one layer tensor; return (PagedCacheLayout, view fn)."""
    bs, h, d = pool.block_tokens, pool.num_kv_heads, pool.head_dim
    dtype = str(layer.dtype).removeprefix("torch.")
    shape = tuple(layer.shape)
    if pool.kv_kind == "mla":
        if layer.dim() == 3 and shape[1:] == (bs, d):
            return PagedCacheLayout.mla(num_layers, shape[0], bs, d, dtype), lambda t: t.unsqueeze(2)
    elif layer.dim() == 5 and shape[0] == 2 and shape[2:] == (bs, h, d):
        return PagedCacheLayout.vllm(num_layers, shape[1], bs, h, d, dtype), lambda t: t
    elif layer.dim() == 5 and shape[1] == 2 and shape[2:] == (bs, h, d):
        return (PagedCacheLayout(num_layers, shape[0], bs, h, d, dtype, "kv", "block_first"),
                lambda t: t)
    elif layer.dim() == 4 and shape[1:] == (h, bs, 2 * d):
        # vLLM's CPU backend: K rows then V rows of each (block, head).
        nb = shape[0]
        return (PagedCacheLayout.vllm_cpu(num_layers, nb, bs, h, d, dtype),
                lambda t: t.view(nb, h, 2, bs, d))
    raise ValueError(
        f"the KV cache layout is not one kvpool recognises: {shape} (dtype {layer.dtype}) for "
        f"block_size={bs}, kv_heads={h}, head_dim={d}, kind={pool.kv_kind}; known: [2, blocks, "
        f"block_size, heads, dim], [blocks, 2, block_size, heads, dim], [blocks, heads, block_size, "
        f"2*dim] (CPU), [blocks, block_size, dim] (MLA)"
    )


class PagedBlockMover:
    """The bound engine cache of one worker, and the copies between it and pool blocks.

    ``gather(block_ids, out)`` fills ``out`` (``[n, block_bytes]`` uint8 on the cache's device)
    with engine blocks ``block_ids``; ``scatter(src, block_ids)`` is the inverse. Both queue
    device work on the current stream on a GPU: a reader on another thread must wait for it.
    """

    def __init__(self, kv_caches: dict[str, torch.Tensor], pool_layout: KVLayout) -> None:
        names = sorted(kv_caches, key=_layer_index)
        if len(names) != pool_layout.num_layers:
            raise ValueError(f"the engine registered {len(names)} KV cache tensors but its KV cache config "
                             f"names {pool_layout.num_layers} layers")
        self.pool_layout = pool_layout
        self.paged, view = paged_layout_from_tensors(kv_caches[names[0]], pool_layout, len(names))
        self.bound = self.paged.bind([view(kv_caches[n]) for n in names])
        self.device = self.bound.device
        fast = self.device.type == "cuda" and self.paged.chunks_contiguous
        self._gather: Callable = gather_blocks if fast else gather_blocks_ref
        self._scatter: Callable = scatter_blocks if fast else scatter_blocks_ref

    @property
    def kernel(self) -> str:
        """The name of the copy function in use (``gather_blocks`` or ``gather_blocks_ref``)."""
        return self._gather.__name__

    def staging(self, n: int) -> torch.Tensor:
        """A buffer for ``n`` pool blocks on the cache's device."""
        return torch.empty((n, self.pool_layout.block_bytes), dtype=torch.uint8, device=self.device)

    def _table(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.int64, device=self.device)

    def gather(self, block_ids: list[int], out: torch.Tensor) -> torch.Tensor:
        return self._gather(self.bound, self._table(block_ids), out, layout=self.paged)

    def scatter(self, src: torch.Tensor, block_ids: list[int]) -> None:
        self._scatter(src, self.bound, self._table(block_ids), layout=self.paged)
