from __future__ import annotations

import pytest

from kvpool.layout import KVLayout


def test_block_bytes_and_shape():
    kv = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16", block_tokens=16)
    assert kv.shape == (32, 2, 16, 8, 128)
    assert kv.block_bytes == 32 * 2 * 16 * 8 * 128 * 2 == 2 * 2**20
    mla = KVLayout(num_layers=61, num_kv_heads=1, head_dim=576, dtype="bfloat16", block_tokens=64, kv_kind="mla")
    assert mla.shape == (61, 64, 1, 576)
    assert mla.block_bytes == 61 * 64 * 576 * 2


def test_fingerprint_changes_with_every_field():
    base = KVLayout(4, 2, 64, "float16", 16, "kv")
    variants = [KVLayout(5, 2, 64, "float16", 16), KVLayout(4, 4, 64, "float16", 16), KVLayout(4, 2, 128, "float16", 16),
                KVLayout(4, 2, 64, "bfloat16", 16), KVLayout(4, 2, 64, "float16", 32), KVLayout(4, 2, 64, "float16", 16, "mla")]
    assert len({base.fingerprint, *(v.fingerprint for v in variants)}) == 7
    assert KVLayout.from_canonical(base.canonical()) == base


@pytest.mark.parametrize("kw,msg", [
    (dict(num_layers=0), "num_layers"), (dict(head_dim=-1), "head_dim"), (dict(dtype="float13"), "float13"),
    (dict(kv_kind="qkv"), "kv_kind"), (dict(block_tokens=True), "block_tokens"),
])
def test_validation(kw, msg):
    args = dict(num_layers=1, num_kv_heads=1, head_dim=8)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        KVLayout(**args)
