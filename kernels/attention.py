"""Prefix-prefill attention: compute only the suffix of a prompt whose prefix is cached.

After a pool hit, a prefill worker has the KV of the first ``prefix_len`` tokens of each
prompt in its paged cache (scattered there from pool blocks) and must compute the rest.
``prefix_attention`` runs causal attention for those new (suffix) tokens over

1. the cached prefix, read from the paged cache through the sequence's block table, and
2. the suffix tokens themselves (their K and V passed in, causal within the suffix),

and writes the suffix K and V into the paged cache at positions ``prefix_len ..
prefix_len + suffix_len - 1`` of the same block table, so the cache then holds the whole
prompt. RoPE must already be applied to ``q`` and ``k``.

Batches are ragged, packed like vLLM's varlen prefill: ``q``, ``k``, ``v`` are
``[total_new_tokens, heads, head_dim]`` and ``query_start_loc[b] .. query_start_loc[b+1]``
are sequence ``b``'s new tokens. A prefix may end mid-block; the first new token then lands
in the same engine block, right after it. GQA: ``num_q_heads`` is a multiple of
``num_kv_heads``; query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``.

The kernel is flash-attention style: one program per (sequence, query head, tile of
``BLOCK_M`` new tokens), an online softmax in fp32 over key tiles of ``BLOCK_N``, and the
output normalized once at the end. Query ``i`` of a suffix (0-based) sees every prefix token
and suffix tokens ``0..i``: the bottom-right-aligned causal mask.

Invariant: the kernel reads the prefix only from the cache and the suffix only from the
``k``/``v`` inputs, and writes only suffix positions of the cache, so reads and writes of
the cache never touch the same bytes and no program waits for another.
"""

from __future__ import annotations

import math

from kvpool.kernels.paged_layout import PagedCacheLayout
from kvpool.kernels.runtime import runnable_kernel

try:  # triton is optional: the reference works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["prefix_attention", "prefix_attention_ref"]

_LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _prefix_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr,  # [tokens, heads, dim] each (new tokens only)
        cache_ptr,  # one layer of the paged cache
        block_table_ptr,  # [batch, max_blocks] engine block ids
        q_start_ptr,  # [batch + 1] int32: where each sequence's new tokens start
        prefix_len_ptr,  # [batch] int32: cached tokens of each sequence
        qk_scale,  # softmax scale * log2(e): the kernel uses exp2
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_bt,  # elements between block-table rows
        plane_stride,  # elements from a K chunk to its V chunk
        block_stride,  # elements between engine blocks
        GROUP: tl.constexpr,  # query heads per KV head
        NUM_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two (>= 16)
        BLOCK_SIZE: tl.constexpr,  # tokens per engine block
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs
        UPCAST: tl.constexpr,  # dot in fp32 on values rounded to the input dtype (interpreter bf16)
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        m_tile = tl.program_id(2)
        q_start = tl.load(q_start_ptr + seq)
        q_len = tl.load(q_start_ptr + seq + 1) - q_start
        if m_tile * BLOCK_M >= q_len:
            return  # the grid is sized for the longest suffix of the batch
        prefix = tl.load(prefix_len_ptr + seq)
        kv_head = head // GROUP
        dtype = q_ptr.dtype.element_ty

        offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # suffix positions of this tile
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        md_mask = m_mask[:, None] & d_mask[None, :]

        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=md_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
        token_stride: tl.constexpr = NUM_KV_HEADS * HEAD_DIM

        # Phase 1: the cached prefix, through the block table. Every prefix token precedes
        # every new token, so only the length masks apply.
        for start in range(0, prefix, BLOCK_N):
            offs_n = start + offs_n0
            n_mask = offs_n < prefix
            blk = tl.load(table_row + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            kv_off = blk * block_stride + (offs_n % BLOCK_SIZE) * token_stride + kv_head * HEAD_DIM
            nd_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(cache_ptr + kv_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
            v = tl.load(cache_ptr + plane_stride + kv_off[:, None] + offs_d[None, :],
                        mask=nd_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(dtype)
            if UPCAST:
                p = p.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new

        # Phase 2: the new tokens, causal. Keys past this tile's last query are never needed.
        k_rows_base = k_ptr + kv_head * stride_kh
        v_rows_base = v_ptr + kv_head * stride_vh
        hi = tl.minimum(q_len, (m_tile + 1) * BLOCK_M)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + offs_n0
            n_mask = offs_n < q_len
            krows = (q_start + offs_n).to(tl.int64)
            nd_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_rows_base + krows[:, None] * stride_kt + offs_d[None, :],
                        mask=nd_mask, other=0.0)
            v = tl.load(v_rows_base + krows[:, None] * stride_vt + offs_d[None, :],
                        mask=nd_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            causal = (offs_n[None, :] <= offs_m[:, None]) & n_mask[None, :]
            s = tl.where(causal, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(dtype)
            if UPCAST:
                p = p.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded rows, which are not stored
        out = acc / l_safe[:, None]
        tl.store(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=md_mask)

        # Append this tile's new K and V to the cache: once per KV head, by its first
        # query head. Positions prefix + offs_m may start mid-block, after the prefix.
        if head % GROUP == 0:
            pos = prefix + offs_m
            blk = tl.load(table_row + pos // BLOCK_SIZE, mask=m_mask, other=0).to(tl.int64)
            dst = blk * block_stride + (pos % BLOCK_SIZE) * token_stride + kv_head * HEAD_DIM
            k_new = tl.load(k_rows_base + rows[:, None] * stride_kt + offs_d[None, :],
                            mask=md_mask, other=0.0)
            v_new = tl.load(v_rows_base + rows[:, None] * stride_vt + offs_d[None, :],
                            mask=md_mask, other=0.0)
            tl.store(cache_ptr + dst[:, None] + offs_d[None, :], k_new, mask=md_mask)
            tl.store(cache_ptr + plane_stride + dst[:, None] + offs_d[None, :], v_new,
                     mask=md_mask)


def _check_args(q, k, v, kv_cache, block_table, query_start_loc, prefix_lens, layout, out,
                validate):
    """Shape, dtype and device checks shared by the kernel and the reference."""
    import torch

    if not isinstance(layout, PagedCacheLayout):
        raise ValueError(f"layout must be a PagedCacheLayout, got {type(layout).__name__}")
    if layout.kv_kind != "kv":
        raise ValueError(
            "prefix_attention needs separate K and V planes (kv_kind='kv'); MLA latent "
            "caches need an MLA attention kernel"
        )
    layout.check_layer(kv_cache, "kv_cache (one layer)")
    dtype = layout.torch_dtype()
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"prefix_attention supports float16, bfloat16 and float32, not {dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a [tokens, heads, head_dim] tensor")
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but the cache is {layout.dtype}")
        if t.device != kv_cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {kv_cache.device}")
        if t.shape[-1] != layout.head_dim or t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have a contiguous last dimension of head_dim={layout.head_dim}, "
                f"got shape {tuple(t.shape)} strides {t.stride()}"
            )
    tokens, num_q_heads, _ = q.shape
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (tokens, layout.num_kv_heads, layout.head_dim):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected "
                f"({tokens}, {layout.num_kv_heads}, {layout.head_dim}): one row per new token"
            )
    if num_q_heads % layout.num_kv_heads:
        raise ValueError(
            f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={layout.num_kv_heads}"
        )
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table must be an int32/int64 [batch, max_blocks] tensor")
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        raise ValueError("block_table rows must be contiguous (pass block_table.contiguous())")
    batch = block_table.shape[0]
    if tuple(query_start_loc.shape) != (batch + 1,) or tuple(prefix_lens.shape) != (batch,):
        raise ValueError(
            f"block_table has {batch} rows: query_start_loc must be [{batch + 1}] and "
            f"prefix_lens [{batch}], got {tuple(query_start_loc.shape)} and "
            f"{tuple(prefix_lens.shape)}"
        )
    for name, t in (("block_table", block_table), ("query_start_loc", query_start_loc),
                    ("prefix_lens", prefix_lens)):
        if t.device != kv_cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {kv_cache.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(-1) != 1):
        raise ValueError("out must match q in shape, dtype and device, with a contiguous last dim")
    if validate and batch:
        starts = query_start_loc.long().cpu()
        q_lens = starts[1:] - starts[:-1]
        if int(starts[0]) != 0 or int(starts[-1]) != tokens or bool((q_lens < 0).any()):
            raise ValueError(
                f"query_start_loc must rise from 0 to the {tokens} new tokens, "
                f"got {starts.tolist()}"
            )
        prefixes = prefix_lens.long().cpu()
        if bool((prefixes < 0).any()):
            raise ValueError(f"prefix_lens must be >= 0, got {prefixes.tolist()}")
        need = int(((prefixes + q_lens + layout.block_size - 1) // layout.block_size).max())
        if need > block_table.shape[1]:
            raise ValueError(
                f"a sequence needs {need} blocks for its prefix and new tokens but block_table "
                f"rows hold {block_table.shape[1]}; allocate the new tokens' blocks first"
            )
        used = [block_table[b, : (int(prefixes[b] + q_lens[b]) + layout.block_size - 1)
                            // layout.block_size] for b in range(batch)]
        ids = torch.cat(used).long() if used else torch.empty(0, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= layout.num_blocks):
            raise ValueError(
                f"block_table names blocks in [{int(ids.min())}, {int(ids.max())}] but the "
                f"cache has {layout.num_blocks}"
            )
    return num_q_heads


def prefix_attention(q, k, v, kv_cache, block_table, query_start_loc, prefix_lens, *,
                     layout: PagedCacheLayout, scale: float | None = None, out=None,
                     max_query_len: int | None = None, validate: bool = True,
                     block_m: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None):
    """Attention of the new tokens over cached prefix + themselves; appends their K/V to the cache.

    ``q``: [tokens, num_q_heads, head_dim]; ``k``, ``v``: [tokens, num_kv_heads, head_dim];
    ``kv_cache``: one layer of the paged cache, as ``layout`` describes it;
    ``block_table``: [batch, max_blocks], covering each sequence's prefix and new tokens;
    ``query_start_loc``: int32 [batch + 1]; ``prefix_lens``: int32 [batch].
    ``scale`` defaults to ``1/sqrt(head_dim)``. ``max_query_len`` (the longest suffix) sizes
    the grid; pass it to avoid a device sync. ``validate=False`` skips the checks that read
    the index tensors on the host. Returns ``out`` ([tokens, num_q_heads, head_dim]).
    """
    import torch

    if triton is None:
        raise RuntimeError(
            "prefix_attention needs the 'triton' package (pip install 'kvpool[gpu]'); "
            "prefix_attention_ref works without it"
        )
    num_q_heads = _check_args(q, k, v, kv_cache, block_table, query_start_loc, prefix_lens,
                              layout, out, validate)
    if out is None:
        out = torch.empty_like(q)
    batch = block_table.shape[0]
    if batch == 0 or q.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    scale = 1.0 / math.sqrt(layout.head_dim) if scale is None else float(scale)
    if not layout.chunks_contiguous:
        raise ValueError(f"prefix_attention does not read plane_order={layout.plane_order!r} "
                         f"caches; use prefix_attention_ref")
    kernel = runnable_kernel(_prefix_attention_kernel, q.device, "prefix_attention_ref")
    interpreting = type(kernel).__name__ == "InterpretedFunction"
    block_d = max(16, triton.next_power_of_2(layout.head_dim))
    if interpreting:
        block_m, block_n = block_m or 16, block_n or 16
    else:
        if q.dtype == torch.float32:
            # fp32 dots run on FMA units ("ieee"), not tensor cores: small tiles keep the
            # unrolled code (and its compile time) in bounds.
            block_m, block_n = block_m or 32, block_n or 32
        else:
            block_m = block_m or (128 if block_d <= 128 else 64)
            block_n = block_n or (64 if block_d <= 128 else 32)
    extra = {}
    if not interpreting:
        extra["num_warps"] = num_warps or (8 if block_m >= 128 else 4)
        extra["num_stages"] = num_stages or 2
    cache_strides = kv_cache.stride()
    plane_stride = cache_strides[layout.plane_dim]
    block_stride = cache_strides[layout.block_dim]
    q_start = query_start_loc.to(torch.int32)
    prefixes = prefix_lens.to(torch.int32)
    grid = (batch, num_q_heads, triton.cdiv(max_query_len, block_m))
    kernel[grid](
        q, k, v, out, kv_cache, block_table, q_start, prefixes,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        block_table.stride(0), plane_stride, block_stride,
        GROUP=num_q_heads // layout.num_kv_heads, NUM_KV_HEADS=layout.num_kv_heads,
        HEAD_DIM=layout.head_dim, BLOCK_D=block_d, BLOCK_SIZE=layout.block_size,
        BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreting and q.dtype == torch.bfloat16,
        **extra,
    )
    return out


def prefix_attention_ref(q, k, v, kv_cache, block_table, query_start_loc, prefix_lens, *,
                         layout: PagedCacheLayout, scale: float | None = None, out=None,
                         max_query_len: int | None = None, validate: bool = True,
                         block_m: int | None = None, block_n: int | None = None,
                         num_warps: int | None = None, num_stages: int | None = None):
    """Reference for :func:`prefix_attention`: per sequence, in fp32, plain torch.

    Tiling arguments are accepted for signature parity and ignored. Each sequence is
    computed from fresh tensors of its own (its blocks gathered by ``index_select``, its
    queries grouped by KV head in a new buffer), so its result depends only on its own
    inputs and lengths, never on the other sequences of the batch. The CPU model in
    :mod:`kvpool.worker` relies on that.
    """
    import torch

    num_q_heads = _check_args(q, k, v, kv_cache, block_table, query_start_loc, prefix_lens,
                              layout, out, validate)
    if out is None:
        out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(layout.head_dim) if scale is None else float(scale)
    kv_heads = layout.num_kv_heads
    group = num_q_heads // kv_heads
    dim = layout.head_dim
    bs = layout.block_size
    if layout.plane_order == "kv_first":
        k_plane, v_plane = kv_cache[0], kv_cache[1]  # [num_blocks, bs, heads, dim]
    elif layout.plane_order == "head_first":
        k_plane = kv_cache[:, :, 0].transpose(1, 2)  # [num_blocks, bs, heads, dim] (a view)
        v_plane = kv_cache[:, :, 1].transpose(1, 2)
    else:
        k_plane, v_plane = kv_cache[:, 0], kv_cache[:, 1]
    starts = query_start_loc.tolist()
    for b, prefix in enumerate(prefix_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        n_new = hi - lo
        if n_new == 0:
            continue
        total = prefix + n_new
        n_blocks = (total + bs - 1) // bs
        blocks = block_table[b, :n_blocks].long()
        pos = torch.arange(prefix, total, device=q.device)
        # Append first, then read everything back: the cache is the one source of K/V.
        k_plane[blocks[pos // bs], pos % bs] = k[lo:hi]
        v_plane[blocks[pos // bs], pos % bs] = v[lo:hi]
        # [kv_heads, S, dim], gathered a whole block at a time.
        keys = k_plane.index_select(0, blocks).reshape(n_blocks * bs, kv_heads, dim)[:total]
        vals = v_plane.index_select(0, blocks).reshape(n_blocks * bs, kv_heads, dim)[:total]
        keys = keys.float().permute(1, 2, 0)  # [kv_heads, dim, S]
        vals = vals.float().transpose(0, 1)  # [kv_heads, S, dim]
        # GQA without copying K/V per query head: query head h reads KV head h // group,
        # so the queries of one KV head form one [group * n_new, dim] matrix.
        qg = (q[lo:hi].float().reshape(n_new, kv_heads, group, dim).permute(1, 2, 0, 3)
              .reshape(kv_heads, group * n_new, dim))
        scores = torch.matmul(qg, keys).mul_(scale).view(kv_heads, group, n_new, total)
        allowed = (torch.arange(total, device=q.device)[None, :]
                   <= (prefix + torch.arange(n_new, device=q.device))[:, None])
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(kv_heads, group * n_new, total)
        o = torch.matmul(probs, vals).view(kv_heads, group, n_new, dim)
        out[lo:hi] = o.permute(2, 0, 1, 3).reshape(n_new, num_q_heads, dim).to(out.dtype)
    return out
