"""Paged KV gather and scatter: engine blocks <-> contiguous pool blocks, all layers per launch.

``gather_blocks`` copies the engine blocks named by a block table out of an engine's paged
cache (described by a :class:`~kvpool.kernels.paged_layout.PagedCacheLayout`) into pool
blocks laid out as :class:`kvpool.layout.KVLayout` says: layers x planes x tokens x heads x
dim. ``scatter_blocks`` is the inverse. A pool block may span ``k`` engine blocks (pool
``block_tokens = k * block_size``); it then takes ``k`` consecutive block-table entries.

Bytes are copied as raw bits through a same-width integer view, so every dtype the layout
allows (fp32, fp16, bf16, fp8, int8) copies exactly and no value is ever converted.

One launch covers every layer. Program ``(j, l*P + p)`` copies plane ``p`` of layer ``l`` of
block-table entry ``j``: a contiguous chunk of ``block_size * heads * dim`` elements on both
sides (the invariant stated in ``paged_layout``). Layers are reached through one anchor
pointer plus a device table of per-layer element offsets (see ``BoundPagedCache``), which
works both for separately allocated layer tensors and for one stacked tensor.

Each launcher has a plain-torch reference of the same signature beside it.
"""

from __future__ import annotations

from typing import Any

from kvpool.kernels.paged_layout import BoundPagedCache, PagedCacheLayout
from kvpool.kernels.runtime import runnable_kernel
from kvpool.layout import KVLayout

try:  # triton is optional: the references work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["gather_blocks", "scatter_blocks", "gather_blocks_ref", "scatter_blocks_ref"]


if triton is not None:

    @triton.jit
    def _paged_copy_kernel(
        cache_ptr,  # anchor layer of the engine cache (raw-bits integer view)
        layer_off_ptr,  # int64 [num_layers]: element offset of each layer from the anchor
        block_table_ptr,  # int32/int64 [n_entries]: engine block of each entry
        pool_ptr,  # [n_entries / SUB_BLOCKS, *pool block], contiguous, same raw dtype
        plane_stride,  # elements between the K and V planes of a layer (0 for MLA)
        block_stride,  # elements between consecutive engine blocks of a layer
        n_entries,
        NUM_LAYERS: tl.constexpr,
        PLANES: tl.constexpr,
        SUB_BLOCKS: tl.constexpr,  # engine blocks per pool block
        CHUNK: tl.constexpr,  # elements per (entry, layer, plane): block_size*heads*dim
        TILE: tl.constexpr,
        TO_POOL: tl.constexpr,  # True: gather (cache -> pool); False: scatter
        ALIGN: tl.constexpr,  # elements every cache chunk start is a multiple of (<= 16 B)
    ):
        entry = tl.program_id(0)
        lp = tl.program_id(1)  # layer * PLANES + plane
        layer = lp // PLANES
        plane = lp % PLANES
        valid = entry < n_entries
        block = tl.load(block_table_ptr + entry, mask=valid, other=0).to(tl.int64)
        layer_off = tl.load(layer_off_ptr + layer, mask=layer < NUM_LAYERS, other=0)
        cache_base = layer_off + plane.to(tl.int64) * plane_stride + block * block_stride
        # The offset table hides alignment from the compiler; restating it (checked on the
        # host) is what lets a GPU move 16 bytes per load instead of one element.
        cache_base = tl.multiple_of(cache_base, ALIGN)
        # Pool chunk order is (pool block, layer, plane, sub-block): KVLayout with
        # block_tokens = SUB_BLOCKS * block_size.
        pool_block = entry // SUB_BLOCKS
        sub = entry % SUB_BLOCKS
        pool_base = ((pool_block.to(tl.int64) * (NUM_LAYERS * PLANES) + lp) * SUB_BLOCKS + sub) * CHUNK
        # An out-of-range program copies nothing. (A limit, not `mask & valid`: the
        # interpreter rejects a vector mask and-ed with a scalar predicate.)
        limit = tl.where(valid, CHUNK, 0)
        for start in range(0, CHUNK, TILE):
            offs = start + tl.arange(0, TILE)
            mask = offs < limit
            if TO_POOL:
                vals = tl.load(cache_ptr + cache_base + offs, mask=mask)
                tl.store(pool_ptr + pool_base + offs, vals, mask=mask)
            else:
                vals = tl.load(pool_ptr + pool_base + offs, mask=mask)
                tl.store(cache_ptr + cache_base + offs, vals, mask=mask)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "the Triton copy kernels need the 'triton' package (pip install 'kvpool[gpu]'); "
            "gather_blocks_ref/scatter_blocks_ref work without it"
        )


def _prepare(kv_caches: Any, block_table, pool_blocks, layout: PagedCacheLayout,
             pool_layout: KVLayout | None, validate: bool):
    """Shared argument checks. Returns (bound cache, flat table, raw pool view, sub_blocks)."""
    import torch

    if not isinstance(layout, PagedCacheLayout):
        raise ValueError(f"layout must be a PagedCacheLayout, got {type(layout).__name__}")
    pool = layout.to_kv_layout() if pool_layout is None else pool_layout
    sub_blocks = layout.check_pool_layout(pool)
    bound = layout.bind(kv_caches)
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table must be an int32 or int64 torch.Tensor of engine block ids")
    table = block_table.reshape(-1)
    if not table.is_contiguous():
        table = table.contiguous()
    n_entries = table.numel()
    if n_entries % sub_blocks:
        raise ValueError(
            f"block_table has {n_entries} entries, not a multiple of the {sub_blocks} engine "
            f"blocks per pool block (pool block_tokens={pool.block_tokens}, engine "
            f"block_size={layout.block_size}); only whole pool blocks move"
        )
    n_pool = n_entries // sub_blocks
    if table.device != bound.device:
        raise ValueError(f"block_table is on {table.device} but the cache is on {bound.device}")
    if validate and n_entries:
        lo, hi = int(table.min()), int(table.max())
        if lo < 0 or hi >= layout.num_blocks:
            raise ValueError(
                f"block_table holds ids in [{lo}, {hi}] but the cache has "
                f"{layout.num_blocks} blocks (valid ids 0..{layout.num_blocks - 1})"
            )
    if not isinstance(pool_blocks, torch.Tensor):
        raise ValueError("pool_blocks must be a torch.Tensor")
    if pool_blocks.device != bound.device:
        raise ValueError(
            f"pool_blocks is on {pool_blocks.device} but the cache is on {bound.device}; "
            f"copy through pinned host memory separately"
        )
    if not pool_blocks.is_contiguous():
        raise ValueError("pool_blocks must be contiguous (n pool blocks laid end to end)")
    want = n_pool * pool.block_bytes
    got = pool_blocks.numel() * pool_blocks.element_size()
    if got != want:
        raise ValueError(
            f"pool_blocks holds {got} bytes but {n_pool} pool blocks of {pool.block_bytes} "
            f"bytes ({pool.shape}) need {want}"
        )
    if pool_blocks.dtype not in (layout.torch_dtype(), torch.uint8, layout.raw_dtype()):
        raise ValueError(
            f"pool_blocks has dtype {pool_blocks.dtype}; use {layout.dtype} (the cache's "
            f"dtype) or uint8 (raw pool bytes)"
        )
    raw_pool = pool_blocks.view(-1).view(layout.raw_dtype()) if n_pool else pool_blocks
    return bound, table, raw_pool, sub_blocks, n_pool


def _launch(bound: BoundPagedCache, table, raw_pool, sub_blocks: int, to_pool: bool) -> None:
    layout = bound.layout
    if not layout.chunks_contiguous:
        raise ValueError(
            f"the Triton copy kernels need each plane of an engine block to be contiguous; "
            f"plane_order={layout.plane_order!r} is not (use gather_blocks_ref/scatter_blocks_ref)"
        )
    n_entries = table.numel()
    if n_entries == 0:
        return
    chunk = layout.chunk_elems
    tile = min(triton.next_power_of_2(chunk), 4096)
    grid = (n_entries, layout.num_layers * layout.planes)
    runnable_kernel(_paged_copy_kernel, bound.device, "gather_blocks_ref/scatter_blocks_ref")[grid](
        bound.anchor, bound.layer_offsets, table, raw_pool,
        bound.plane_stride, bound.block_stride, n_entries,
        NUM_LAYERS=layout.num_layers, PLANES=layout.planes, SUB_BLOCKS=sub_blocks,
        CHUNK=chunk, TILE=tile, TO_POOL=to_pool, ALIGN=bound.align_elems,
        num_warps=8 if tile >= 2048 else 4,
    )


def gather_blocks(kv_caches, block_table, pool_blocks, *, layout: PagedCacheLayout,
                  pool_layout: KVLayout | None = None, validate: bool = True):
    """Copy the engine blocks in ``block_table`` into ``pool_blocks`` (one launch, all layers).

    ``kv_caches``: per-layer tensors, one stacked tensor, or ``layout.bind(...)``.
    ``block_table``: int32/int64 engine block ids, ``k`` per pool block (any shape; flattened).
    ``pool_blocks``: contiguous, ``n_pool * pool_layout.block_bytes`` bytes, dtype of the
    cache or uint8. ``pool_layout`` defaults to ``layout.to_kv_layout()``.
    ``validate=False`` skips the block-id range check (it synchronizes with the device).
    Returns ``pool_blocks``.
    """
    bound, table, raw_pool, sub, _ = _prepare(kv_caches, block_table, pool_blocks, layout,
                                              pool_layout, validate)
    _require_triton()
    _launch(bound, table, raw_pool, sub, to_pool=True)
    return pool_blocks


def scatter_blocks(pool_blocks, kv_caches, block_table, *, layout: PagedCacheLayout,
                   pool_layout: KVLayout | None = None, validate: bool = True):
    """Copy ``pool_blocks`` into the engine blocks named by ``block_table`` (inverse of gather).

    Block ids in the table must be distinct: two entries naming one engine block race.
    Returns ``kv_caches`` as given.
    """
    bound, table, raw_pool, sub, _ = _prepare(kv_caches, block_table, pool_blocks, layout,
                                              pool_layout, validate)
    _require_triton()
    _launch(bound, table, raw_pool, sub, to_pool=False)
    return kv_caches


# -- plain-torch references ------------------------------------------------------------------


def _ref_views(kv_caches, block_table, pool_blocks, layout, pool_layout, validate):
    bound, table, raw_pool, sub, n_pool = _prepare(kv_caches, block_table, pool_blocks,
                                                   layout, pool_layout, validate)
    # Pool view: [n_pool, layers, planes, sub, block_size, heads, dim]
    pool_view = raw_pool.view(n_pool, layout.num_layers, layout.planes, sub,
                              layout.block_size, layout.num_kv_heads, layout.head_dim)
    ids = table.long().view(n_pool, sub)
    return bound, ids, pool_view


def _plane_major(layout: PagedCacheLayout, raw_layer):
    """A layer as [planes, num_blocks, block_size, heads, dim] (a view, no copy)."""
    if layout.kv_kind == "mla":
        return raw_layer.unsqueeze(0)
    if layout.plane_order == "kv_first":
        return raw_layer
    if layout.plane_order == "head_first":  # [NB, h, P, bs, d] -> [P, NB, bs, h, d]
        return raw_layer.permute(2, 0, 3, 1, 4)
    return raw_layer.transpose(0, 1)


def gather_blocks_ref(kv_caches, block_table, pool_blocks, *, layout: PagedCacheLayout,
                      pool_layout: KVLayout | None = None, validate: bool = True):
    """Reference for :func:`gather_blocks` in plain torch (indexing, no Triton)."""
    bound, ids, pool_view = _ref_views(kv_caches, block_table, pool_blocks, layout,
                                       pool_layout, validate)
    for layer, raw in enumerate(bound.raw_layers):
        planes = _plane_major(layout, raw)  # [P, NB, bs, h, d]
        # planes[:, ids] -> [P, n_pool, sub, bs, h, d]; pool wants [n_pool, P, sub, ...]
        pool_view[:, layer] = planes[:, ids].transpose(0, 1)
    return pool_blocks


def scatter_blocks_ref(pool_blocks, kv_caches, block_table, *, layout: PagedCacheLayout,
                       pool_layout: KVLayout | None = None, validate: bool = True):
    """Reference for :func:`scatter_blocks` in plain torch (indexing, no Triton)."""
    bound, ids, pool_view = _ref_views(kv_caches, block_table, pool_blocks, layout,
                                       pool_layout, validate)
    flat_ids = ids.reshape(-1)
    for layer, raw in enumerate(bound.raw_layers):
        planes = _plane_major(layout, raw)
        src = pool_view[:, layer].transpose(0, 1)  # [P, n_pool, sub, bs, h, d]
        planes[:, flat_ids] = src.reshape(layout.planes, -1, *src.shape[3:])
    return kv_caches
