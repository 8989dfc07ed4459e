#!/usr/bin/env python3
"""GPU data path vs its own ceilings, measured in one run (docs/design.md §6).

* **gather / scatter**: the paged copy kernels moving ``--blocks`` pool blocks of a
  32-layer, 8-head, 128-dim, 16-token bf16 cache (2 MiB each), against a device-to-device
  ``torch`` copy of the same number of bytes.
* **d2h / h2d**: the same blocks through a pinned :class:`DramArena`, one copy per slot as
  the tier does it, against one copy into (from) a plain ``torch`` pinned buffer.
* **prefix prefill**: ``prefix_attention`` on one sequence of 2K, 8K and 32K tokens whose
  first half is cached (32 query heads, 8 KV heads, dim 128, bf16), against
  ``torch.nn.functional.scaled_dot_product_attention`` computing the same attention (the new
  half's queries over all keys, bottom-right causal) on contiguous tensors. The ratio is
  SDPA time / kernel time, i.e. the kernel's share of SDPA's throughput; a few tile configs
  are tried and the best is kept (reported in the detail line).

Times are medians of CUDA-event-timed repetitions after warm-up. The last line is JSON:
{"bench":"gpu","gather_ratio":…,"scatter_ratio":…,"d2h_ratio":…,"h2d_ratio":…,
"prefill_vs_sdpa":{"2k":…,"8k":…,"32k":…}}. Without CUDA there is nothing to measure and
it exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

GIB = 1 << 30


def fail(msg: str) -> int:
    print(f"bench_gpu: {msg}", file=sys.stderr)
    return 2


def time_ms(fn, *, iters: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_copies(n_blocks: int, iters: int) -> dict:
    import torch

    from kvpool.kernels.paged_copy import gather_blocks, scatter_blocks
    from kvpool.kernels.paged_layout import PagedCacheLayout

    num_blocks = max(2 * n_blocks, 1024)
    layout = PagedCacheLayout.vllm(32, num_blocks, 16, 8, 128, "bfloat16")
    pool = layout.to_kv_layout()
    cache = [torch.randn(layout.layer_shape, device="cuda").to(torch.bfloat16)
             for _ in range(layout.num_layers)]
    bound = layout.bind(cache)
    table = torch.randperm(num_blocks, device="cuda")[:n_blocks].to(torch.int32)
    blocks = torch.empty(n_blocks * pool.block_bytes, dtype=torch.uint8, device="cuda")
    src = torch.empty_like(blocks).random_(0, 255)
    dst = torch.empty_like(blocks)
    nbytes = blocks.numel()

    t_copy = time_ms(lambda: dst.copy_(src), iters=iters)
    t_gather = time_ms(lambda: gather_blocks(bound, table, blocks, layout=layout,
                                             validate=False), iters=iters)
    t_scatter = time_ms(lambda: scatter_blocks(blocks, bound, table, layout=layout,
                                               validate=False), iters=iters)
    gbps = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
    del cache, bound, blocks, src, dst
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "d2d_gbps": gbps(t_copy), "gather_gbps": gbps(t_gather),
            "scatter_gbps": gbps(t_scatter)}


def bench_pinned(n_blocks: int, iters: int) -> dict:
    import torch

    from kvpool.tiers.dram import DramArena

    block = 2 << 20
    st = os.statvfs("/dev/shm")
    fit = int(st.f_bavail * st.f_frsize * 0.8) // block
    n = min(n_blocks, fit)
    if n < 8:
        raise RuntimeError(f"/dev/shm has room for only {fit} 2 MiB blocks; enlarge it")
    arena = DramArena(n * block, chunk_bytes=min(64 << 20, n * block))
    try:
        if not arena.pin():
            raise RuntimeError("DramArena.pin() failed (see the log: ulimit -l?)")
        slots = [arena.allocate(block) for _ in range(n)]
        host = torch.from_numpy(arena.array)
        assert host.is_pinned(), "the registered arena does not read as pinned memory"
        views = [host[s.offset : s.offset + s.size] for s in slots]
        dev = torch.empty(n * block, dtype=torch.uint8, device="cuda").random_(0, 255)
        dev_views = [dev[i * block : (i + 1) * block] for i in range(n)]
        plain = torch.empty(n * block, dtype=torch.uint8, pin_memory=True)

        def tier_d2h():
            for v, d in zip(views, dev_views):
                v.copy_(d, non_blocking=True)

        def tier_h2d():
            for v, d in zip(views, dev_views):
                d.copy_(v, non_blocking=True)

        t_plain_d2h = time_ms(lambda: plain.copy_(dev, non_blocking=True), iters=iters)
        t_plain_h2d = time_ms(lambda: dev.copy_(plain, non_blocking=True), iters=iters)
        t_tier_d2h = time_ms(tier_d2h, iters=iters)
        t_tier_h2d = time_ms(tier_h2d, iters=iters)
        nbytes = n * block
        gbps = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
        del views, host, dev_views
        return {"bytes": nbytes, "plain_d2h_gbps": gbps(t_plain_d2h),
                "plain_h2d_gbps": gbps(t_plain_h2d), "tier_d2h_gbps": gbps(t_tier_d2h),
                "tier_h2d_gbps": gbps(t_tier_h2d)}
    finally:
        arena.close()


PREFILL_CONFIGS = [  # (block_m, block_n, num_warps, num_stages)
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 3),
]


def bench_prefill(context: int, iters: int) -> dict:
    import torch
    import torch.nn.functional as F

    from kvpool.kernels.paged_layout import PagedCacheLayout
    from kvpool.kernels.attention import prefix_attention

    q_heads, kv_heads, dim, bs = 32, 8, 128, 16
    prefix, new = context // 2, context - context // 2
    n_blocks = -(-context // bs)
    layout = PagedCacheLayout.vllm(1, n_blocks + 16, bs, kv_heads, dim, "bfloat16")
    cache = torch.randn(layout.layer_shape, device="cuda").to(torch.bfloat16)
    table = torch.randperm(layout.num_blocks, device="cuda")[:n_blocks].to(torch.int32)[None]
    q = torch.randn(new, q_heads, dim, device="cuda").to(torch.bfloat16)
    k = torch.randn(new, kv_heads, dim, device="cuda").to(torch.bfloat16)
    v = torch.randn(new, kv_heads, dim, device="cuda").to(torch.bfloat16)
    starts = torch.tensor([0, new], dtype=torch.int32, device="cuda")
    prefixes = torch.tensor([prefix], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    # SDPA over the same tokens, contiguous and with K/V already expanded to every query
    # head (so SDPA does exactly the kernel's FLOPs and no GQA gather).
    pos = torch.arange(context, device="cuda")
    blocks, slots = table[0].long()[pos // bs], pos % bs
    prefix_attention(q, k, v, cache, table, starts, prefixes, layout=layout, out=out,
                     max_query_len=new)  # fills the cache with the new K/V
    keys = cache[0][blocks, slots].transpose(0, 1).repeat_interleave(q_heads // kv_heads, 0)
    vals = cache[1][blocks, slots].transpose(0, 1).repeat_interleave(q_heads // kv_heads, 0)
    qs = q.transpose(0, 1)[None]
    keys, vals = keys[None].contiguous(), vals[None].contiguous()
    try:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(new, context)
        mask_kind = "causal_lower_right"
    except ImportError:  # older torch: an explicit boolean mask
        mask = pos[None, :] <= (prefix + torch.arange(new, device="cuda"))[:, None]
        mask_kind = "bool"
    t_sdpa = time_ms(lambda: F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask),
                     iters=iters)
    # The whole prompt recomputed, for scale: what a pool hit saves.
    full_q = torch.randn(1, q_heads, context, dim, device="cuda").to(torch.bfloat16)
    t_full = time_ms(lambda: F.scaled_dot_product_attention(full_q, keys, vals, is_causal=True),
                     iters=iters)
    del full_q

    best = None
    for bm, bn, warps, stages in PREFILL_CONFIGS:
        try:
            ms = time_ms(lambda: prefix_attention(
                q, k, v, cache, table, starts, prefixes, layout=layout, out=out,
                max_query_len=new, validate=False, block_m=bm, block_n=bn,
                num_warps=warps, num_stages=stages), iters=iters)
        except Exception as exc:  # a config that does not fit this GPU (shared memory)
            print(f"  prefill {context}: config {(bm, bn, warps, stages)} failed: {exc!r}",
                  file=sys.stderr)
            continue
        if best is None or ms < best[0]:
            best = (ms, (bm, bn, warps, stages))
    if best is None:
        raise RuntimeError("no prefix_attention config ran")
    flops = 4 * q_heads * dim * new * (prefix + (new + 1) / 2)
    return {"context": context, "kernel_ms": best[0], "config": best[1], "sdpa_ms": t_sdpa,
            "sdpa_mask": mask_kind, "full_recompute_sdpa_ms": t_full,
            "kernel_tflops": flops / (best[0] * 1e-3) / 1e12, "ratio": t_sdpa / best[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=512, help="2 MiB blocks per copy round")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--contexts", default="2048,8192,32768")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return fail("TRITON_INTERPRET is set: the interpreter cannot be timed; unset it")
    try:
        import torch
    except ImportError:
        return fail("torch is not installed; nothing to measure")
    if not torch.cuda.is_available():
        return fail(f"CUDA is not available (torch {torch.__version__}): this benchmark "
                    f"measures GPU copies and kernels and cannot run on a CPU")
    try:
        import triton  # noqa: F401
    except ImportError:
        return fail("triton is not installed (pip install 'kvpool[gpu]')")

    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, triton {triton.__version__}")
    copies = bench_copies(args.blocks, args.iters)
    print(f"copy ({copies['bytes'] / GIB:.2f} GiB): d2d {copies['d2d_gbps']:.1f} GB/s, "
          f"gather {copies['gather_gbps']:.1f} GB/s, scatter {copies['scatter_gbps']:.1f} GB/s")
    pinned = bench_pinned(args.blocks, args.iters)
    print(f"pinned ({pinned['bytes'] / GIB:.2f} GiB): D2H tier {pinned['tier_d2h_gbps']:.1f} vs "
          f"plain {pinned['plain_d2h_gbps']:.1f} GB/s; H2D tier {pinned['tier_h2d_gbps']:.1f} "
          f"vs plain {pinned['plain_h2d_gbps']:.1f} GB/s")
    prefill = {}
    detail = []
    for context in (int(c) for c in args.contexts.split(",")):
        r = bench_prefill(context, max(5, args.iters // 2))
        key = f"{context // 1024}k"
        prefill[key] = round(r["ratio"], 3)
        detail.append(r)
        print(f"prefill {key} (50% cached): kernel {r['kernel_ms']:.3f} ms "
              f"({r['kernel_tflops']:.0f} TFLOP/s, config {r['config']}), SDPA same tokens "
              f"{r['sdpa_ms']:.3f} ms ({r['sdpa_mask']}), full recompute SDPA "
              f"{r['full_recompute_sdpa_ms']:.3f} ms -> ratio {r['ratio']:.2f}")
    print(json.dumps({"bench": "gpu", "device": device, "copies": copies, "pinned": pinned,
                      "prefill": detail}, default=str))
    print(json.dumps({
        "bench": "gpu",
        "gather_ratio": round(copies["gather_gbps"] / copies["d2d_gbps"], 3),
        "scatter_ratio": round(copies["scatter_gbps"] / copies["d2d_gbps"], 3),
        "d2h_ratio": round(pinned["tier_d2h_gbps"] / pinned["plain_d2h_gbps"], 3),
        "h2d_ratio": round(pinned["tier_h2d_gbps"] / pinned["plain_h2d_gbps"], 3),
        "prefill_vs_sdpa": prefill,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
