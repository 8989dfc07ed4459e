"""Prefix-prefill attention kernel vs its torch reference, under the Triton interpreter.

Tolerances (max abs error of the output, whose entries are O(1)): the kernel and the
reference read identical inputs; the kernel accumulates in fp32 but, like every flash
kernel, rounds the softmax probabilities to the input dtype before the P@V product, while
the reference stays in fp32 throughout. That rounding bounds the error at a few ulps of the
input dtype. Observed worst cases over several seeds: fp32 6e-7, fp16 2e-3 (2 ulps of
outputs near 1-2), bf16 1.6e-2. Allowed: fp32 2e-5, fp16 4e-3, bf16 3e-2 (about twice the
observed, so a real bug, which shows up as errors of order 0.1-1, cannot hide). The K/V
appended to the cache are copies, so they must match exactly.
"""

import math

import pytest
import torch

from kvpool.kernels.paged_layout import PagedCacheLayout
from kvpool.kernels.attention import prefix_attention, prefix_attention_ref

pytestmark = pytest.mark.usefixtures("need_triton")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def make_case(prefix_lens, new_lens, *, q_heads, kv_heads, head_dim=16, block_size=4,
              dtype="float16", plane_order="kv_first", spare_blocks=3):
    """A ragged batch whose sequences own shuffled, non-adjacent engine blocks."""
    per_seq = [math.ceil((p + n) / block_size) for p, n in zip(prefix_lens, new_lens)]
    width = max(per_seq)
    num_blocks = sum(per_seq) + spare_blocks
    layout = PagedCacheLayout(1, num_blocks, block_size, kv_heads, head_dim, dtype, "kv",
                              plane_order)
    tdtype = DTYPES[dtype]
    cache = torch.randn(layout.layer_shape).to(tdtype)  # prefix KV already in place
    ids = torch.randperm(num_blocks)
    table = torch.full((len(prefix_lens), width), -1, dtype=torch.int32)
    used = 0
    for b, count in enumerate(per_seq):
        table[b, :count] = ids[used : used + count]
        used += count
    table[table < 0] = 0  # padding entries are never read
    total = sum(new_lens)
    q = torch.randn(total, q_heads, head_dim).to(tdtype)
    k = torch.randn(total, kv_heads, head_dim).to(tdtype)
    v = torch.randn(total, kv_heads, head_dim).to(tdtype)
    starts = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], dtype=torch.int32)
    prefixes = torch.tensor(prefix_lens, dtype=torch.int32)
    return layout, cache, table, q, k, v, starts, prefixes


def run_both(case, **kw):
    layout, cache, table, q, k, v, starts, prefixes = case
    cache_kernel, cache_ref = cache.clone(), cache.clone()
    got = prefix_attention(q, k, v, cache_kernel, table, starts, prefixes, layout=layout, **kw)
    want = prefix_attention_ref(q, k, v, cache_ref, table, starts, prefixes, layout=layout, **kw)
    return got, want, cache_kernel, cache_ref


def check(case, dtype, **kw):
    got, want, cache_kernel, cache_ref = run_both(case, **kw)
    assert torch.isfinite(got.float()).all()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= ATOL[dtype], f"max abs error {err} > {ATOL[dtype]} ({dtype})"
    assert torch.equal(cache_kernel, cache_ref), "appended K/V differ from the reference"
    assert not torch.equal(cache_kernel, case[1]), "the new K/V were not written"
    return err


# Ragged: an empty prefix, prefixes ending mid-block and on a block edge, a one-token suffix,
# and a suffix longer than one BLOCK_M tile (16 in the interpreter).
RAGGED_PREFIX = [0, 5, 8, 23]
RAGGED_NEW = [7, 1, 20, 18]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group", [1, 4, 8])
def test_ragged_batch_gqa(dtype, group):
    kv_heads = 2 if group < 8 else 1
    case = make_case(RAGGED_PREFIX, RAGGED_NEW, q_heads=kv_heads * group, kv_heads=kv_heads,
                     dtype=dtype)
    check(case, dtype)


def test_block_first_layout_odd_head_dim_and_scale():
    # head_dim 24 pads to a 32-wide tile; the block_first plane order swaps the outer strides.
    case = make_case([3, 14], [9, 5], q_heads=4, kv_heads=1, head_dim=24, block_size=8,
                     dtype="float32", plane_order="block_first")
    check(case, "float32", scale=0.3)


def test_only_new_tokens_and_only_one_new_token():
    check(make_case([0, 0], [5, 17], q_heads=2, kv_heads=2, dtype="float16"), "float16")
    check(make_case([31, 12], [1, 1], q_heads=4, kv_heads=2, dtype="float16"), "float16")


def test_prefix_changes_the_answer():
    """Guards against a kernel that ignores the cached prefix (and a reference that does too)."""
    layout, cache, table, q, k, v, starts, prefixes = make_case([9], [6], q_heads=2, kv_heads=2,
                                                                dtype="float32")
    with_prefix = prefix_attention(q, k, v, cache.clone(), table, starts, prefixes, layout=layout)
    zeroed = cache.clone()
    zeroed[0, table[0, :2].long()] = 0  # wipe the K of the first 8 prefix tokens
    without = prefix_attention(q, k, v, zeroed, table, starts, prefixes, layout=layout)
    assert (with_prefix - without).abs().max() > 1e-3


def test_reference_matches_sdpa_on_contiguous_tokens():
    """The reference itself, checked against torch's SDPA with a bottom-right causal mask."""
    prefix, new, heads = 10, 6, 2
    layout, cache, table, q, k, v, starts, prefixes = make_case(
        [prefix], [new], q_heads=heads, kv_heads=heads, dtype="float32")
    cache_before = cache.clone()
    out = prefix_attention_ref(q, k, v, cache, table, starts, prefixes, layout=layout)
    pos = torch.arange(prefix)
    blocks, slots = table[0].long()[pos // 4], pos % 4
    keys = torch.cat([cache_before[0][blocks, slots], k])  # [S, H, D]
    vals = torch.cat([cache_before[1][blocks, slots], v])
    mask = torch.arange(prefix + new)[None, :] <= (prefix + torch.arange(new))[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)
    assert (out - want).abs().max() < 1e-5


def test_rejects_short_block_table_and_bad_heads():
    layout, cache, table, q, k, v, starts, prefixes = make_case([6], [6], q_heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        prefix_attention(q, k, v, cache, table[:, :2], starts, prefixes, layout=layout)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        prefix_attention(q[:, :3], k, v, cache, table, starts, prefixes, layout=layout)
    with pytest.raises(ValueError, match="query_start_loc must rise"):
        prefix_attention(q, k, v, cache, table, starts - 1, prefixes, layout=layout)
    mla = PagedCacheLayout.mla(1, 4, 4, 16, dtype="float16")
    with pytest.raises(ValueError, match="MLA"):
        prefix_attention(q, k, v, cache, table, starts, prefixes, layout=mla)


COMPILE_SCRIPT = r"""
import inspect, triton
from triton.backends.compiler import GPUTarget
from kvpool.kernels.attention import _prefix_attention_kernel as K
names = list(inspect.signature(K.fn).parameters)
# The launcher's default tiles for bf16 at head_dim 128 and fp16 at a padded head_dim.
# (fp32 compiles slowly, ~10 s per config on 2 cores; tests/gpu covers it on a GPU.)
for dt, prec, bm, bn, hd in (("bf16", "tf32", 128, 64, 128), ("fp16", "tf32", 128, 64, 80)):
    sig = {}
    for n in names:
        if n.isupper():
            sig[n] = "constexpr"
        elif n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "cache_ptr"):
            sig[n] = "*" + dt
        elif n.endswith("_ptr"):
            sig[n] = "*i32"
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i32"
    consts = dict(GROUP=4, NUM_KV_HEADS=8, HEAD_DIM=hd, BLOCK_D=max(16, triton.next_power_of_2(hd)),
                  BLOCK_SIZE=16, BLOCK_M=bm, BLOCK_N=bn, PRECISION=prec, UPCAST=False)
    src = triton.compiler.ASTSource(fn=K, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8 if bm >= 128 else 4, "num_stages": 2})
    assert "cubin" in k.asm and k.metadata.shared <= 227 * 1024, (dt, k.metadata.shared)
    print(dt, hd, "ok")
"""


def test_attention_kernel_compiles_for_sm90():
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
    assert r.stdout.count("ok") == 2


def test_package_name_is_the_function_even_after_its_module_is_imported():
    # The kernel once lived in a module of its own name: importing that module replaced the
    # package attribute (the function) with the module.
    import kvpool.kernels
    import kvpool.kernels.attention  # noqa: F401

    assert kvpool.kernels.prefix_attention is kvpool.kernels.attention.prefix_attention
    assert callable(kvpool.kernels.prefix_attention)
