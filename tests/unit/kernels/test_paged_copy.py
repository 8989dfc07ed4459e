"""Paged gather/scatter kernels vs their torch references, bit for bit, under the interpreter."""

import pytest
import torch

from kvpool.kernels.paged_copy import (
    gather_blocks,
    gather_blocks_ref,
    scatter_blocks,
    scatter_blocks_ref,
)
from kvpool.kernels.paged_layout import PagedCacheLayout
from kvpool.layout import KVLayout

pytestmark = pytest.mark.usefixtures("need_triton")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RAW = {2: torch.int16, 4: torch.int32}

LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM = 3, 7, 4, 2, 8


def random_bits(shape, dtype):
    """Any bit pattern, NaN payloads and -0.0 included: a conversion would change some."""
    raw = RAW[torch.empty(0, dtype=dtype).element_size()]
    info = torch.iinfo(raw)
    return torch.randint(info.min, info.max, shape, dtype=raw).view(dtype)


def same_bits(a, b):
    raw = RAW[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(raw), b.view(raw))


def make_layout(kind, dtype):
    if kind == "mla":
        return PagedCacheLayout.mla(LAYERS, NUM_BLOCKS, BLOCK_SIZE, DIM, dtype=dtype)
    order = "kv_first" if kind in ("vllm_list", "vllm_stacked", "vllm_reversed") else "block_first"
    return PagedCacheLayout(LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype, "kv", order)


def make_cache(kind, layout):
    dtype = layout.torch_dtype()
    if kind == "vllm_stacked":
        return random_bits(layout.stacked_shape, dtype)
    if kind == "vllm_reversed":
        # Layers of one allocation in descending address order: the anchor is the last layer.
        stacked = random_bits(layout.stacked_shape, dtype)
        return list(stacked.unbind(0))[::-1]
    # Separate allocations, in whatever address order the allocator picks.
    return [random_bits(layout.layer_shape, dtype) for _ in range(layout.num_layers)]


def layer_list(cache):
    return list(cache.unbind(0)) if isinstance(cache, torch.Tensor) else list(cache)


def plane_view(layout, layer):
    """[planes, num_blocks, block_size, heads, dim] view of one layer."""
    if layout.kv_kind == "mla":
        return layer.unsqueeze(0)
    return layer if layout.plane_order == "kv_first" else layer.transpose(0, 1)


KINDS = ["vllm_list", "vllm_stacked", "vllm_reversed", "block_first", "mla"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sub_blocks", [1, 2])
def test_gather_matches_reference_and_ground_truth(kind, dtype, sub_blocks):
    layout = make_layout(kind, dtype)
    pool = layout.to_kv_layout(BLOCK_SIZE * sub_blocks)
    cache = make_cache(kind, layout)
    table = torch.tensor([5, 0, 3, 3, 6, 1][: 2 * sub_blocks * (2 if sub_blocks == 1 else 1)],
                         dtype=torch.int32)  # repeats are fine for a gather
    n_pool = table.numel() // sub_blocks
    out = torch.full((n_pool, *pool.shape), 7, dtype=layout.torch_dtype())
    ref = torch.zeros_like(out)

    gather_blocks(cache, table, out, layout=layout, pool_layout=pool)
    gather_blocks_ref(cache, table, ref, layout=layout, pool_layout=pool)
    assert same_bits(out, ref)

    # Independent ground truth, token by token, from the definition of the pool layout.
    layers = layer_list(cache)
    for e, blk in enumerate(table.tolist()):
        i, sub = divmod(e, sub_blocks)
        for layer in range(LAYERS):
            planes = plane_view(layout, layers[layer])
            for p in range(layout.planes):
                got = out[i, layer, p] if layout.kv_kind == "kv" else out[i, layer]
                got = got[sub * BLOCK_SIZE : (sub + 1) * BLOCK_SIZE]
                assert same_bits(got, planes[p, blk].clone())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_scatter_matches_reference_and_leaves_other_blocks(kind, dtype):
    layout = make_layout(kind, dtype)
    pool = layout.to_kv_layout()
    cache = make_cache(kind, layout)
    cache_ref = ([t.clone() for t in cache] if isinstance(cache, list) else cache.clone())
    before = [t.clone() for t in layer_list(cache)]
    table = torch.tensor([4, 1, 6], dtype=torch.int64)
    blocks = random_bits((3, *pool.shape), layout.torch_dtype())

    scatter_blocks(blocks, cache, table, layout=layout)
    scatter_blocks_ref(blocks, cache_ref, table, layout=layout)
    for got, want, old in zip(layer_list(cache), layer_list(cache_ref), before):
        assert same_bits(got, want)
        untouched = [b for b in range(NUM_BLOCKS) if b not in (4, 1, 6)]
        assert same_bits(plane_view(layout, got)[:, untouched], plane_view(layout, old)[:, untouched])
        assert not same_bits(got, old)

    # And back: gathering what was scattered gives the pool blocks again.
    again = torch.empty_like(blocks)
    gather_blocks(cache, table, again, layout=layout)
    assert same_bits(again, blocks)


def test_uint8_pool_and_bound_cache():
    layout = PagedCacheLayout.vllm(LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM, "bfloat16")
    cache = make_cache("vllm_list", layout)
    bound = layout.bind(cache)
    table = torch.tensor([2, 5], dtype=torch.int32)
    raw = torch.zeros(2 * layout.to_kv_layout().block_bytes, dtype=torch.uint8)
    typed = torch.zeros(2, *layout.to_kv_layout().shape, dtype=torch.bfloat16)
    gather_blocks(bound, table, raw, layout=layout)
    gather_blocks_ref(cache, table, typed, layout=layout)
    assert torch.equal(raw, typed.view(-1).view(torch.uint8))
    assert raw.any()


def test_empty_table_is_a_no_op():
    layout = PagedCacheLayout.vllm(LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM, "float16")
    cache = make_cache("vllm_list", layout)
    out = torch.empty(0, *layout.to_kv_layout().shape, dtype=torch.float16)
    assert gather_blocks(cache, torch.empty(0, dtype=torch.int32), out, layout=layout) is out


# -- the descriptor refuses what does not match it, and says why -------------------------


@pytest.fixture
def vllm_setup():
    layout = PagedCacheLayout.vllm(LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM, "float16")
    cache = make_cache("vllm_list", layout)
    out = torch.empty(2, *layout.to_kv_layout().shape, dtype=torch.float16)
    return layout, cache, out


def test_rejects_block_id_out_of_range(vllm_setup):
    layout, cache, out = vllm_setup
    with pytest.raises(ValueError, match=r"valid ids 0\.\.6"):
        gather_blocks(cache, torch.tensor([1, NUM_BLOCKS]), out, layout=layout)


def test_rejects_wrong_layer_count(vllm_setup):
    layout, cache, out = vllm_setup
    with pytest.raises(ValueError, match="got 2 layer tensors.*num_layers=3"):
        gather_blocks(cache[:2], torch.tensor([1, 2]), out, layout=layout)


def test_rejects_wrong_shape_naming_the_layout(vllm_setup):
    layout, cache, out = vllm_setup
    swapped = [t.transpose(0, 1).contiguous() for t in cache]  # block_first data, kv_first layout
    with pytest.raises(ValueError, match=r"layer 0 tensor has shape .*num_blocks"):
        gather_blocks(swapped, torch.tensor([1, 2]), out, layout=layout)


def test_rejects_wrong_dtype(vllm_setup):
    layout, cache, out = vllm_setup
    with pytest.raises(ValueError, match="dtype torch.float32 but the layout says float16"):
        gather_blocks([t.float() for t in cache], torch.tensor([1, 2]), out, layout=layout)


def test_rejects_non_contiguous_inner_dims(vllm_setup):
    layout, cache, out = vllm_setup
    odd = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in cache]
    with pytest.raises(ValueError, match="must be contiguous"):
        gather_blocks(odd, torch.tensor([1, 2]), out, layout=layout)


def test_rejects_pool_of_wrong_size(vllm_setup):
    layout, cache, out = vllm_setup
    with pytest.raises(ValueError, match="need"):
        gather_blocks(cache, torch.tensor([1, 2, 3]), out, layout=layout)


def test_rejects_mismatched_pool_layout(vllm_setup):
    layout, cache, out = vllm_setup
    other = KVLayout(LAYERS, HEADS, DIM, "bfloat16", BLOCK_SIZE)
    with pytest.raises(ValueError, match="dtype"):
        gather_blocks(cache, torch.tensor([1, 2]), out, layout=layout, pool_layout=other)
    with pytest.raises(ValueError, match="not a multiple"):
        layout.to_kv_layout(BLOCK_SIZE + 1)


def test_rejects_table_not_whole_pool_blocks(vllm_setup):
    layout, cache, out = vllm_setup
    pool = layout.to_kv_layout(2 * BLOCK_SIZE)
    with pytest.raises(ValueError, match="only whole pool blocks"):
        gather_blocks(cache, torch.tensor([1, 2, 3]), out, layout=layout, pool_layout=pool)


def test_descriptor_validates_itself():
    with pytest.raises(ValueError, match="plane_order"):
        PagedCacheLayout(1, 1, 1, 1, 1, "float16", "kv", "heads_first")
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        PagedCacheLayout.vllm(1, 0, 16, 8, 128)
    layout = PagedCacheLayout.vllm(32, 100, 16, 8, 128, "bfloat16")
    assert layout.layer_shape == (2, 100, 16, 8, 128)
    assert layout.to_kv_layout().block_bytes == 32 * 2 * 16 * 8 * 128 * 2
    assert PagedCacheLayout.mla(4, 10, 64, 576).layer_shape == (10, 64, 1, 576)


COMPILE_SCRIPT = r"""
import re, triton
from triton.backends.compiler import GPUTarget
from kvpool.kernels.paged_copy import _paged_copy_kernel as K
sig = {"cache_ptr": "*i16", "layer_off_ptr": "*i64", "block_table_ptr": "*i32",
       "pool_ptr": "*i16", "plane_stride": "i32", "block_stride": "i32", "n_entries": "i32"}
consts = dict(NUM_LAYERS=32, PLANES=2, SUB_BLOCKS=1, CHUNK=16 * 8 * 128, TILE=4096,
              TO_POOL=True, ALIGN=8)
sig.update({name: "constexpr" for name in consts})
attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}  # what the launcher specializes
src = triton.compiler.ASTSource(fn=K, signature=sig, constexprs=consts, attrs=attrs)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print("vector_loads", len(re.findall(r"ld\.global(\.\w+)*\.v4", k.asm["ptx"])))
"""


def test_copy_kernel_compiles_for_sm90_with_16_byte_loads():
    """The real (non-interpreted) compile for an H100 target; needs no GPU, only ptxas."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=240)
    if r.returncode and ("ptxas" in r.stderr or "No module named 'triton.backends.nvidia'" in r.stderr):
        pytest.skip(f"triton's CUDA backend cannot compile here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    loads = int(r.stdout.split("vector_loads")[-1])
    assert loads > 0, "the copy kernel lost its 16-byte vector loads (alignment hints?)"


def test_head_first_cpu_layout_gathers_by_reference_and_is_refused_by_triton():
    """vLLM's CPU cache ([blocks, heads, block_size, 2*dim] = [blocks, heads, 2, bs, dim])."""
    lay = PagedCacheLayout.vllm_cpu(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=3, head_dim=8,
                                    dtype="float32")
    layers = [torch.randn(6, 3, 4, 16).view(6, 3, 2, 4, 8) for _ in range(2)]
    table = torch.tensor([5, 1], dtype=torch.int64)
    pool = torch.empty(2 * lay.to_kv_layout().block_bytes, dtype=torch.uint8)
    gather_blocks_ref(layers, table, pool, layout=lay)
    got = pool.view(torch.float32).view(2, *lay.to_kv_layout().shape)  # [n, layers, 2, bs, heads, dim]
    for j, b in enumerate(table.tolist()):
        for l in range(2):
            assert torch.equal(got[j, l], layers[l][b].permute(1, 2, 0, 3))
    fresh = [torch.zeros_like(t) for t in layers]
    scatter_blocks_ref(pool, fresh, table, layout=lay)
    for l in range(2):
        assert torch.equal(fresh[l][table], layers[l][table]) and not fresh[l][0].any()
    with pytest.raises(ValueError, match="head_first"):
        gather_blocks(layers, table, pool, layout=lay)
