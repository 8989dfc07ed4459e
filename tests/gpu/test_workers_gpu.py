"""Disaggregated prefill and decode on a GPU with the Triton kernels (skipped without CUDA).

The same claim as tests/integration/test_workers.py, on CUDA in bfloat16: prefill worker
-> pool -> decode worker gives exactly the tokens of a colocated worker, with and without a
prefix from the pool. The workers run `prefix_attention` and the paged copy kernels compiled
by Triton; blocks move between the GPU caches and the pool's pinned DRAM by DMA.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvpool.worker.launch import start_worker
from kvpool.worker.router import Router
from tests.conftest import start_serve

MODEL = ["--model", "small", "--seed", "3", "--device", "cuda", "--cache-tokens", "32768"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    pool = start_serve(tmp_path_factory.mktemp("gpu-workers"), "--dram", "512MiB")
    procs = []
    try:
        for role, args in (("prefill", ["--pool", pool.address]), ("decode", ["--pool", pool.address]),
                           ("colocated", [])):
            procs.append(start_worker(role, *args, *MODEL, timeout=600))
        yield procs
    finally:
        for p in procs:
            p.stop()
        pool.stop()


def run(router: Router, prompts):
    async def go():
        async with router:
            return [await router.submit(p, MAX_TOKENS) for p in prompts]

    return asyncio.run(go())


def test_disaggregated_equals_colocated_on_cuda(deployment):
    prefill, decode, colocated = deployment
    for p in deployment:
        assert "kernels=triton" in p.log(), p.log()
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(0, 4096, (300,), generator=gen).tolist()
    # Ragged and block-aligned ends (blocks of 64), then turns that extend the system prompt.
    prompts = [torch.randint(0, 4096, (n,), generator=gen).tolist() for n in (1, 63, 64, 200, 1000)]
    prompts += [system, system + torch.randint(0, 4096, (77,), generator=gen).tolist(), system + [5] * 28]
    disagg = run(Router(prefill=[prefill.address], decode=[decode.address]), prompts)
    coloc = run(Router(colocated=[colocated.address]), prompts)
    for p, d, c in zip(prompts, disagg, coloc):
        assert d.tokens == c.tokens, f"prompt of {len(p)} tokens"
        assert d.decode["hit_tokens"] == len(p) // 64 * 64
    # The two later turns took the system prompt's four full blocks from the pool.
    assert [d.prefill["hit_tokens"] for d in disagg[-2:]] == [256, 256]
