"""The Triton kernels compiled for a real GPU, at real model sizes, against their references."""

import pytest

torch = pytest.importorskip("torch")

# Kernel modules are imported inside the tests, never at collection: importing them defines
# the kernels, and triton fixes compiled-vs-interpreted at that moment (tests/unit/kernels
# sets TRITON_INTERPRET=1 for the CPU tests when its conftest is collected).
from kvpool.kernels.paged_layout import PagedCacheLayout  # noqa: E402  (no triton here)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_kernels")]

LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 16
RAW = {2: torch.int16, 4: torch.int32}


def bits(t):
    return t.view(RAW[t.element_size()])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("form", ["list", "stacked"])
@pytest.mark.parametrize("sub_blocks", [1, 4])
def test_gather_scatter_real_sizes(dtype, form, sub_blocks):
    from kvpool.kernels.paged_copy import (
        gather_blocks,
        gather_blocks_ref,
        scatter_blocks,
        scatter_blocks_ref,
    )

    layout = PagedCacheLayout.vllm(LAYERS, 256, BLOCK, HEADS, DIM, dtype)
    pool = layout.to_kv_layout(BLOCK * sub_blocks)
    tdtype = layout.torch_dtype()
    if form == "stacked":
        cache = torch.randn(layout.stacked_shape, device="cuda").to(tdtype)
    else:
        cache = [torch.randn(layout.layer_shape, device="cuda").to(tdtype) for _ in range(LAYERS)]
    table = torch.randperm(256, device="cuda")[: 48 * sub_blocks].to(torch.int32)
    n = 48
    got = torch.empty(n, *pool.shape, dtype=tdtype, device="cuda")
    want = torch.empty_like(got)
    gather_blocks(cache, table, got, layout=layout, pool_layout=pool)
    gather_blocks_ref(cache, table, want, layout=layout, pool_layout=pool)
    assert torch.equal(bits(got), bits(want))

    blocks = torch.randn_like(got, dtype=torch.float32).to(tdtype)
    other = [t.clone() for t in cache] if form == "list" else cache.clone()
    scatter_blocks(blocks, cache, table, layout=layout, pool_layout=pool)
    scatter_blocks_ref(blocks, other, table, layout=layout, pool_layout=pool)
    a = torch.stack(list(cache)) if form == "list" else cache
    b = torch.stack(list(other)) if form == "list" else other
    assert torch.equal(bits(a), bits(b))


ATOL = {"bfloat16": 3e-2, "float16": 4e-3, "float32": 1e-4}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefix_attention_real_sizes(dtype, group):
    from kvpool.kernels.attention import prefix_attention, prefix_attention_ref

    prefix_lens, new_lens = [0, 1000, 517, 2048], [512, 300, 1, 1000]
    kv_heads = HEADS
    per_seq = [-(-(p + n) // BLOCK) for p, n in zip(prefix_lens, new_lens)]
    num_blocks = sum(per_seq) + 8
    layout = PagedCacheLayout.vllm(1, num_blocks, BLOCK, kv_heads, DIM, dtype)
    tdtype = layout.torch_dtype()
    cache = torch.randn(layout.layer_shape, device="cuda").to(tdtype)
    ids = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    table = torch.zeros(len(per_seq), max(per_seq), dtype=torch.int32, device="cuda")
    used = 0
    for b, c in enumerate(per_seq):
        table[b, :c] = ids[used : used + c]
        used += c
    total = sum(new_lens)
    q = torch.randn(total, kv_heads * group, DIM, device="cuda").to(tdtype)
    k = torch.randn(total, kv_heads, DIM, device="cuda").to(tdtype)
    v = torch.randn(total, kv_heads, DIM, device="cuda").to(tdtype)
    starts = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], dtype=torch.int32,
                          device="cuda")
    prefixes = torch.tensor(prefix_lens, dtype=torch.int32, device="cuda")
    c1, c2 = cache.clone(), cache.clone()
    got = prefix_attention(q, k, v, c1, table, starts, prefixes, layout=layout)
    want = prefix_attention_ref(q, k, v, c2, table, starts, prefixes, layout=layout)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= ATOL[dtype], f"max abs error {err} ({dtype}, group {group})"
    assert torch.equal(bits(c1), bits(c2))
