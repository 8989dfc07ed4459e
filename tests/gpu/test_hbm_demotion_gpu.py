"""HBM over its watermark demotes to DRAM instead of dropping blocks, on a real
`kvpool serve --hbm` (needs CUDA; skipped without; tests/unit/master/test_hbm_demotion.py
checks the same bookkeeping on CPU).

The HBM tier holds 8 blocks of 2 MiB. 8 are put there, and fill it: the tiering sweep moves
some to DRAM. 4 more go to DRAM (HBM has no room for the batch). Every block stays readable,
bytes verified, and nothing is evicted.
"""

from __future__ import annotations

import os
import time

import torch

from kvpool import Client, KVLayout, Namespace
from kvpool.rpc.v1 import admin_pb2, common_pb2
from tests.conftest import start_serve
from tests.integration.rpc_helpers import stubs

LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16)  # 2 MiB


def test_blocks_pushed_out_of_hbm_are_read_from_dram(tmp_path):
    sp = start_serve(tmp_path, "--hbm", "16MiB", "--dram", "64MiB", "--slab-bytes", "2MiB")
    try:
        ns = Namespace("gpu/demotion", LAYOUT)
        keys = [os.urandom(16) for _ in range(12)]
        g = torch.Generator(device="cuda").manual_seed(7)
        kv = torch.randn(12, *LAYOUT.shape, device="cuda", generator=g).to(torch.bfloat16)
        with Client(sp.address, ns) as c, stubs(sp.address) as (_, admin):
            for start in (0, 4):
                assert c.put_blocks(keys[start:start + 4], kv[start:start + 4]).written == 4
            time.sleep(1.5)  # a few tiering sweeps: HBM (8 of 8 slots) goes under its watermark
            tiers = [admin.Inspect(admin_pb2.InspectRequest(key=k)).block.tier for k in keys[:8]]
            assert common_pb2.TIER_DRAM in tiers and common_pb2.TIER_HBM in tiers, tiers  # demoted, not dropped
            # HBM has no room for a whole batch now: it goes to DRAM instead of evicting HBM.
            assert c.put_blocks(keys[8:], kv[8:]).written == 4
            out = torch.empty_like(kv)
            c.get_blocks(keys, out)
            assert torch.equal(out.view(torch.int16), kv.view(torch.int16))   # all 12, bytes verified
            stats = c.stats()
            assert stats.blocks == 12 and stats.evictions == 0, stats
    finally:
        sp.stop()
