"""KVPoolStore through SGLang's real StorageBackendFactory and HiCacheStorageConfig, on a real pool.

SGLang's own host KV pool cannot be built here (its import chain needs a CUDA torchvision), so
``HostPool`` below allocates the host buffer with the byte layout SGLang's
``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost`` use, and offers the members the cache
controller and backends read (``kv_buffer``, ``page_size``, ``layer_num``, ``layout``, flat pages).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvpool import Client, KVLayout, Namespace
from kvpool.integrations.sglang import KVPoolStore, engine_hash_bytes
from tests.conftest import start_serve

PAGE, LAYERS, HEADS, DIM = 4, 3, 2, 8
README = Path(__file__).resolve().parents[2] / "README.md"


class HostPool:
    """SGLang's host KV buffer: MHA page_first ``[2, size, layers, heads, dim]``, layer_first
    ``[2, layers, size, heads, dim]``; MLA page_first ``[size, layers, 1, dim]``."""

    def __init__(self, pages: int, mla: bool = False, layout: str = "page_first", seed: int = 0) -> None:
        self.page_size, self.layer_num, self.layout, self.size = PAGE, LAYERS, layout, pages * PAGE
        self.dtype = torch.bfloat16
        if mla:
            dims = (self.size, LAYERS, 1, DIM)
        elif layout == "layer_first":
            dims = (2, LAYERS, self.size, HEADS, DIM)
        else:
            dims = (2, self.size, LAYERS, HEADS, DIM)
        self.mla = mla
        self.kv_buffer = torch.randn(dims, generator=torch.Generator().manual_seed(seed)).to(self.dtype)

    def page(self, index: int) -> torch.Tensor:
        """One page as SGLang's get_data_page(flat=False) returns it (host order)."""
        if self.mla:
            return self.kv_buffer[index:index + PAGE]
        if self.layout == "layer_first":
            return self.kv_buffer[:, :, index:index + PAGE]
        return self.kv_buffer[:, index:index + PAGE]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.page(index)
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(self.page(0).numel(), dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        target = self.page(index)
        target.copy_(data_page.reshape(target.shape))


def readme_extra_config() -> dict:
    """The --hicache-storage-backend-extra-config of README.md's SGLang command."""
    section = re.search(r"## SGLang\n(.*?)\n## ", README.read_text(), re.S).group(1)
    return json.loads(re.search(r"--hicache-storage-backend-extra-config '(\{.*?\})'", section).group(1))


def storage_config(address: str, *, mla: bool = False, tp_rank: int = 0, tp_size: int = 1, v1: bool = True,
                   model: str = "tiny-sglang") -> HiCacheStorageConfig:
    extra = {**readme_extra_config(), "interface_v1": int(v1), "address": address}
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=True, model_name=model, extra_config=extra)


def make_store(address: str, host: HostPool, **kw) -> KVPoolStore:
    store = StorageBackendFactory.create_backend("dynamic", storage_config(address, **kw), host)
    assert type(store) is KVPoolStore
    store.register_mem_pool_host(host)  # what SGLang's cache controller does next
    return store


def page_keys(tag: str, n: int) -> list[str]:
    return [os.urandom(32).hex() for _ in range(n)]


def indices(*pages: int) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_v1_round_trip_between_two_engines_in_canonical_bytes(pool, layout):
    a, b = HostPool(8, layout=layout, seed=1), HostPool(8, layout=layout, seed=2)
    sa, sb = make_store(pool.address, a), make_store(pool.address, b)
    keys = page_keys("v1", 3)
    assert sa.batch_set_v1(keys, indices(1, 2, 3)) == [True] * 3
    assert sb.batch_exists(keys) == 3
    assert sb.batch_exists([keys[0], "ab" * 32, keys[2]]) == 1  # consecutive hits only
    assert sb.batch_get_v1(keys, indices(5, 6, 7)) == [True] * 3
    for src, dst in ((1, 5), (2, 6), (3, 7)):
        assert torch.equal(b.page(dst * PAGE), a.page(src * PAGE))
    assert not torch.equal(b.page(4 * PAGE), a.page(4 * PAGE))  # untouched page stays b's own
    # The pool holds kvpool's canonical block order (layers x K/V x tokens x heads x dim).
    ns = Namespace("tiny-sglang", KVLayout(LAYERS, HEADS, DIM, "bfloat16", PAGE, "kv"))
    with Client(pool.address, ns) as c:
        (block,) = c.get_blocks(ns.engine_keys([engine_hash_bytes(keys[0])]))
    k_then_v = a.page(PAGE).transpose(0, 1) if layout == "layer_first" else a.page(PAGE).permute(2, 0, 1, 3, 4)
    assert torch.equal(torch.from_numpy(np.asarray(block)).view(torch.bfloat16).view(k_then_v.shape), k_then_v)
    sa.close()
    sb.close()


def test_classic_flat_pages_round_trip(pool):
    a, b = HostPool(4, seed=3), HostPool(4, seed=4)
    sa, sb = make_store(pool.address, a, v1=False), make_store(pool.address, b, v1=False)
    keys = page_keys("classic", 2)
    assert sa.batch_set(keys, [a.get_data_page(0), a.get_data_page(PAGE)])
    got = sb.batch_get(keys, [b.get_dummy_flat_data_page() for _ in keys])
    for i, page in enumerate(got):
        b.set_from_flat_data_page((2 + i) * PAGE, page)  # what the cache controller does
    assert torch.equal(b.page(2 * PAGE), a.page(0)) and torch.equal(b.page(3 * PAGE), a.page(PAGE))
    assert sb.get(keys[0]) is not None and sb.get("cd" * 32) is None and sb.exists(keys[1])
    sa.close()
    sb.close()


def test_mla_ranks_share_one_copy_written_by_the_storage_writer(serve_factory):
    # Its own pool: in the module's pool, whose DRAM already holds a few 768-byte blocks, a put
    # of these 192-byte blocks is refused as "pool full ... nothing more is evictable" (seen
    # 2026-11-22; a slab-sizing limit of the DRAM tier, left to its own issue).
    pool = serve_factory()
    r0, r1, reader = HostPool(4, mla=True, seed=5), HostPool(4, mla=True, seed=6), HostPool(4, mla=True, seed=7)
    s0 = make_store(pool.address, r0, mla=True, tp_rank=0, tp_size=2)
    s1 = make_store(pool.address, r1, mla=True, tp_rank=1, tp_size=2)
    keys = page_keys("mla", 2)
    assert s1.batch_set_v1(keys, indices(0, 1)) == [True, True]  # not the writer: nothing stored
    assert s1.batch_exists(keys) == 0
    assert s0.batch_set_v1(keys, indices(0, 1)) == [True, True]
    s2 = make_store(pool.address, reader, mla=True, tp_rank=1, tp_size=2)
    assert s2.batch_exists(keys) == 2 and s2.batch_get_v1(keys, indices(2, 3)) == [True, True]
    assert torch.equal(reader.page(2 * PAGE), r0.page(0)) and torch.equal(reader.page(3 * PAGE), r0.page(PAGE))
    for s in (s0, s1, s2):
        s.close()


def test_failures_are_misses_with_a_log_line_never_exceptions(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sglang.kvpool")
    sp = start_serve(tmp_path)
    host = HostPool(4, seed=8)
    store = make_store(sp.address, host)
    keys = page_keys("gone", 2)
    assert store.batch_set_v1(keys, indices(0, 1)) == [True, True]
    sp.stop()
    before = host.kv_buffer.clone()
    assert store.batch_exists(keys) == 0
    assert store.batch_get_v1(keys, indices(2, 3)) == [False, False]
    assert store.batch_set_v1(page_keys("x", 1), indices(2)) == [False]
    assert store.batch_get(keys, [host.get_dummy_flat_data_page() for _ in keys]) == [None, None]
    assert torch.equal(host.kv_buffer, before)
    text = caplog.text
    assert "lookup of 2 pages failed" in text and "loading 2 pages failed" in text and "storing 1 pages failed" in text
    store.close()
    # A host layout it cannot address turns storage off at registration, loudly, not the engine.
    odd = HostPool(4, seed=9)
    odd.layout = "page_head"
    off = make_store("127.0.0.1:1", odd)
    assert "--hicache-mem-layout page_first" in caplog.text
    assert off.batch_exists(keys) == 0 and off.batch_get_v1(keys, indices(0, 1)) == [False, False]
