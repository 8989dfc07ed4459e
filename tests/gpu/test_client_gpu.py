"""The client's GPU paths against a real `kvpool serve --hbm` (needs CUDA; skipped without).

* CUDA tensors put into the HBM tier through CUDA IPC, read back into CUDA and host memory;
* CUDA tensors put into DRAM (pinned shared memory, DMA) and read back into CUDA memory;
* token-level publish/fetch with CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvpool import Client, KVLayout, Namespace
from kvpool.rpc.v1 import admin_pb2, common_pb2
from tests.conftest import start_serve
from tests.integration.rpc_helpers import stubs

LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16)  # 2 MiB


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    sp = start_serve(tmp_path_factory.mktemp("gpu"), "--hbm", "256MiB", "--dram", "256MiB")
    yield sp
    sp.stop()


def _tier(address: str, key: bytes) -> int:
    with stubs(address) as (_, admin):
        return admin.Inspect(admin_pb2.InspectRequest(key=key)).block.tier


def _blocks(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, *LAYOUT.shape, device="cuda", generator=g).to(torch.bfloat16)


def test_cuda_tensors_go_to_hbm_and_back(gpu_server):
    ns = Namespace("gpu/hbm", LAYOUT)
    keys = [os.urandom(16) for _ in range(8)]
    kv = _blocks(8, 0)
    with Client(gpu_server.address, ns) as c:
        assert c.put_blocks(keys, kv).written == 8
        assert _tier(gpu_server.address, keys[0]) == common_pb2.TIER_HBM
        out = torch.empty_like(kv)
        c.get_blocks(keys, out)
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16))
        host = c.get_blocks(keys[:1])[0]                  # HBM -> host memory
        assert bytes(host) == kv[0].view(torch.uint8).cpu().numpy().tobytes()


def test_cuda_tensors_through_pinned_dram(gpu_server):
    ns = Namespace("gpu/dram", LAYOUT)
    keys = [os.urandom(16) for _ in range(8)]
    kv = _blocks(8, 1)
    with Client(gpu_server.address, ns) as c:
        c.put_blocks(keys, kv, tier="dram")
        assert _tier(gpu_server.address, keys[0]) == common_pb2.TIER_DRAM
        out = torch.zeros_like(kv)
        c.get_blocks(keys, out)                           # DRAM -> GPU by DMA
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16))


def test_publish_fetch_with_cuda_tensors(gpu_server):
    ns = Namespace("gpu/tokens", LAYOUT)
    toks = list(range(16 * 4 + 3))
    kv = _blocks(4, 2)
    with Client(gpu_server.address, ns) as c:
        assert c.publish(toks, kv).written == 4
        out = torch.empty_like(kv)
        assert c.fetch(toks, out) == 4
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16))
