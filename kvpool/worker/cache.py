"""PagedKVCache: a worker's paged KV cache, and the moves between it and pool blocks.

The cache is one stacked tensor in vLLM's flash-attention layout
(:meth:`PagedCacheLayout.vllm`: per layer ``[2, num_blocks, 16, kv_heads, head_dim]``).
Each sequence owns a list of engine blocks (its block table). A pool block of
``block_tokens`` tokens is ``block_tokens // 16`` consecutive entries of that table, and
moves in and out with :mod:`kvpool.kernels.paged_copy` (Triton on a GPU, its torch
reference on the CPU), as raw bits: a block fetched from the pool is bit for bit the KV
that the publishing worker computed.
"""

from __future__ import annotations

from kvpool.errors import KvpoolError
from kvpool.kernels.paged_layout import PagedCacheLayout
from kvpool.worker.config import ModelConfig
from kvpool.worker.kernels import Kernels

__all__ = ["PagedKVCache", "CacheFull", "ENGINE_BLOCK_SIZE"]

#: Tokens per engine block (the paged cache's page), as in vLLM.
ENGINE_BLOCK_SIZE = 16


class CacheFull(KvpoolError):
    """The worker's paged cache has no free blocks for a sequence."""


class PagedKVCache:
    def __init__(self, config: ModelConfig, dtype: str, device, capacity_tokens: int,
                 kernels: Kernels) -> None:
        import torch

        if config.block_tokens % ENGINE_BLOCK_SIZE:
            raise ValueError(f"block_tokens={config.block_tokens} must be a multiple of {ENGINE_BLOCK_SIZE}")
        num_blocks = max(1, -(-capacity_tokens // ENGINE_BLOCK_SIZE))
        self.layout = PagedCacheLayout.vllm(config.num_layers, num_blocks, ENGINE_BLOCK_SIZE,
                                            config.num_kv_heads, config.head_dim, dtype)
        self.pool_layout = self.layout.to_kv_layout(config.block_tokens)
        self.sub_blocks = config.block_tokens // ENGINE_BLOCK_SIZE
        self.kv = torch.zeros(self.layout.stacked_shape, dtype=getattr(torch, dtype), device=device)
        self.bound = self.layout.bind(self.kv)
        self.kernels = kernels
        self.device = self.kv.device
        self._free = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[object, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def reserve(self, seq_id, tokens: int) -> None:
        """Make ``seq_id``'s table cover ``tokens`` positions."""
        table = self._tables.setdefault(seq_id, [])
        need = -(-tokens // ENGINE_BLOCK_SIZE) - len(table)
        if need > len(self._free):
            raise CacheFull(f"the paged cache needs {need} more blocks of {ENGINE_BLOCK_SIZE} tokens "
                            f"but has {len(self._free)} free; give the worker a larger --cache-tokens")
        for _ in range(max(0, need)):
            table.append(self._free.pop())

    def release(self, seq_id) -> None:
        self._free.extend(reversed(self._tables.pop(seq_id, [])))

    def table_len(self, seq_id) -> int:
        return len(self._tables.get(seq_id, ()))

    def block_row(self, seq_id, width: int):
        """The sequence's block table as an int32 row of ``width`` (padding entries are 0)."""
        import torch

        table = self._tables.get(seq_id, [])
        return torch.tensor(table + [0] * (width - len(table)), dtype=torch.int32, device=self.device)

    def _entries(self, seq_id, first: int, count: int):
        import torch

        table = self._tables[seq_id]
        lo, hi = first * self.sub_blocks, (first + count) * self.sub_blocks
        if hi > len(table):
            raise ValueError(f"pool blocks {first}..{first + count - 1} are past the sequence's reserved cache")
        return torch.tensor(table[lo:hi], dtype=torch.int32, device=self.device)

    def staging(self, count: int, device=None):
        """An empty buffer of ``count`` pool blocks, in the cache's dtype."""
        import torch

        return torch.empty((count, *self.pool_layout.shape), dtype=self.kv.dtype,
                           device=self.device if device is None else device)

    def export_blocks(self, seq_id, first: int, count: int, out=None):
        """Gather pool blocks ``first .. first+count-1`` of a sequence into one buffer."""
        out = self.staging(count) if out is None else out
        if count:
            self.kernels.gather(self.bound, self._entries(seq_id, first, count), out,
                                layout=self.layout, pool_layout=self.pool_layout)
        return out

    def import_blocks(self, seq_id, first: int, blocks) -> None:
        """Scatter pool blocks (``[count, *pool shape]``) into the sequence's cache."""
        count = blocks.shape[0]
        if count:
            self.kernels.scatter(blocks, self.bound, self._entries(seq_id, first, count),
                                 layout=self.layout, pool_layout=self.pool_layout)
