"""The vLLM connector's worker-side copy path with CUDA tensors (needs CUDA; skipped without).

``KVPoolConnector`` moves blocks through :class:`kvpool.integrations.block_mover.PagedBlockMover`
(its ``register_kv_caches``, loads and saves call nothing else to copy), so this exercises that
path without vLLM: per-layer caches in vLLM's GPU layouts (flash-attention ``[2, blocks, 16, 8,
128]``, FlashInfer ``[blocks, 2, 16, 8, 128]``, MLA ``[blocks, 16, 576]``), bf16. The Triton
kernels gather engine blocks into a CUDA staging buffer; the bytes go to a real ``kvpool serve``
and back, as the connector's saves and loads do (the save's put on another thread, after the
engine stream's work, as the connector's background publisher runs it), and scatter into other
blocks of a zeroed cache. The result must match the torch reference bit for bit.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from kvpool import Client, KVLayout, Namespace
from kvpool.integrations.block_mover import PagedBlockMover
from tests.conftest import start_serve

LAYERS, NB, BS, H, D, MLA_D = 4, 64, 16, 8, 128, 576
SHAPES = {"flash": (2, NB, BS, H, D), "flashinfer": (NB, 2, BS, H, D), "mla": (NB, BS, MLA_D)}


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    sp = start_serve(tmp_path_factory.mktemp("mover"), "--hbm", "256MiB", "--dram", "256MiB")
    yield sp
    sp.stop()


def caches(form: str, fill: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(3)
    make = (lambda s: torch.randn(s, device="cuda", generator=g).to(torch.bfloat16)) if fill else \
        (lambda s: torch.zeros(s, device="cuda", dtype=torch.bfloat16))
    return {f"model.layers.{l}.self_attn.attn": make(SHAPES[form]) for l in range(LAYERS)}


@pytest.mark.parametrize("form", sorted(SHAPES))
def test_connector_copy_path_with_cuda_caches_through_a_real_pool(gpu_server, compiled_kernels, form):
    mla = form == "mla"
    layout = KVLayout(LAYERS, 1 if mla else H, MLA_D if mla else D, "bfloat16", BS, "mla" if mla else "kv")
    src = caches(form, fill=True)
    mover = PagedBlockMover(src, layout)
    assert mover.kernel == "gather_blocks" and mover.device.type == "cuda"  # the Triton kernels
    ids, dst_ids = [5, 17, 2, 40], [9, 1, 33, 60]
    staging = mover.staging(len(ids))
    mover.gather(ids, staging)
    ref = PagedBlockMover({n: t.cpu() for n, t in src.items()}, layout)
    want = ref.staging(len(ids))
    ref.gather(ids, want)
    assert torch.equal(staging.cpu(), want)

    ns = Namespace(f"gpu/mover/{form}", layout)
    keys = [os.urandom(16) for _ in ids]
    ready = torch.cuda.Event()
    ready.record()  # as the connector does: the put runs on the publisher's thread
    result = {}

    def publish():
        ready.synchronize()
        with Client(gpu_server.address, ns) as c:
            result["put"] = c.put_blocks(keys, staging)

    t = threading.Thread(target=publish)
    t.start()
    t.join(60)
    assert result["put"].written == len(ids)

    dst = caches(form, fill=False)
    loader = PagedBlockMover(dst, layout)
    back = loader.staging(len(ids))
    with Client(gpu_server.address, ns) as c:
        assert all(b is not None for b in c.get_blocks(keys, back, allow_missing=True))
    loader.scatter(back, dst_ids)
    torch.cuda.synchronize()
    again = loader.staging(len(ids))
    loader.gather(dst_ids, again)
    assert torch.equal(again.cpu(), want)
    untouched = [b for b in range(NB) if b not in dst_ids]
    for t_ in dst.values():
        view = t_.transpose(0, 1) if form == "flash" else t_
        assert not view[untouched].any()
