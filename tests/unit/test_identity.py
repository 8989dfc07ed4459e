"""Block identity is a contract (docs/design.md §2): golden vectors, prefix property, separation."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.identity import Namespace, chain_keys, encode_tokens, engine_keys, pack_keys, split_keys
from kvpool.layout import KVLayout

LLAMA = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16)
NS = Namespace("meta-llama/Llama-3.1-8B", LLAMA)


# Golden vectors. If one of these changes, every pool in the field stops matching its
# own blocks: change them only with a new ROOT_PREFIX version.
def test_golden_layout_fingerprint():
    assert LLAMA.canonical() == (
        '{"block_tokens":16,"dtype":"bfloat16","head_dim":128,"kv_kind":"kv","num_kv_heads":8,"num_layers":32}'
    )
    assert LLAMA.fingerprint == "9e82184d43c51b1b"


def test_golden_namespace_root_and_keys():
    assert NS.canonical_bytes() == (
        b'{"layout":"9e82184d43c51b1b","lora":"","model":"meta-llama/Llama-3.1-8B",'
        b'"salt":"","tenant":"","tp_rank":0,"tp_size":1}'
    )
    assert NS.root.hex() == "8b316f856fb3e5e059852b2e13898e3d"
    assert [k.hex() for k in NS.keys(list(range(40)))] == [
        "f8a93b117d8ffb104a7dca07ef5bf20e",
        "c7d7b975c6e67addd92a93fc52c78720",
    ]


def test_golden_engine_hashes():
    assert [k.hex() for k in NS.engine_keys([b"\x01" * 32, 42, -1])] == [
        "323d4c0d4b5dc6a462074718cc7a6292",
        "2fd4fc0a92298a9195fe0c5ef234dd94",
        "1ce3bba2c265e868bfec83caec44050c",
    ]


def test_golden_every_namespace_field():
    ns = Namespace("m", KVLayout(1, 1, 8, "float16", 4, "mla"), tp_rank=1, tp_size=2,
                   tenant="acme", lora="sql-adapter", salt="s3cret")
    assert ns.root.hex() == "2f747bb2ccbfc9f89bf33950824d5a9c"
    assert [k.hex() for k in ns.keys([0, 1, 2, 3, 4294967295, 5, 6, 7])] == [
        "0f10e88ba5c45a112c10f74c982514ac",
        "6df97d5e646d1338232063e294ce26cc",
    ]


def test_chain_matches_the_written_definition():
    # Recompute from docs/design.md §2 with nothing but xxhash and struct.
    toks = list(range(100, 148))
    root = xxhash.xxh3_128_digest(b"kvpool/v1" + NS.canonical_bytes())
    prev, expected = root, []
    for b in range(3):
        prev = xxhash.xxh3_128_digest(prev + struct.pack("<16I", *toks[16 * b : 16 * b + 16]))
        expected.append(prev)
    assert NS.keys(toks) == expected
    assert NS.engine_keys([b"abc"]) == [xxhash.xxh3_128_digest(root + b"abc")]


def test_only_full_blocks_are_keyed():
    assert NS.keys(list(range(15))) == []
    assert len(NS.keys(list(range(16)))) == 1
    assert NS.keys(list(range(47))) == NS.keys(list(range(32)))


def test_token_containers_agree():
    import torch

    toks = list(range(1000, 1064))
    expected = NS.keys(toks)
    assert NS.keys(np.array(toks, dtype=np.int64)) == expected
    assert NS.keys(np.array(toks, dtype=np.uint32)) == expected
    assert NS.keys(torch.tensor(toks)) == expected


@pytest.mark.parametrize("bad", [[-1], [2**32], [[1, 2]], [1.5]])
def test_bad_tokens_are_rejected(bad):
    with pytest.raises(ValueError):
        encode_tokens(bad)


@settings(max_examples=200, deadline=None)
@given(
    common=st.lists(st.integers(0, 2**32 - 1), max_size=80),
    a=st.lists(st.integers(0, 2**32 - 1), max_size=40),
    b=st.lists(st.integers(0, 2**32 - 1), max_size=40),
    block=st.sampled_from([1, 2, 4, 16]),
)
def test_shared_keys_equal_shared_full_blocks(common, a, b, block):
    x, y = common + a, common + b
    kx, ky = chain_keys(NS.root, x, block), chain_keys(NS.root, y, block)
    shared_tokens = 0
    for s, t in zip(x, y):
        if s != t:
            break
        shared_tokens += 1
    full_shared = min(shared_tokens // block, len(kx), len(ky))
    shared_keys = 0
    for p, q in zip(kx, ky):
        if p != q:
            break
        shared_keys += 1
    assert shared_keys == full_shared
    # And no key after the divergence is ever equal (a key names its whole prefix).
    assert not set(kx[full_shared:]) & set(ky[full_shared:])


@pytest.mark.parametrize("change", [
    dict(model="other-model"),
    dict(layout=KVLayout(32, 8, 128, "float16", 16)),
    dict(layout=KVLayout(32, 8, 128, "bfloat16", 32)),
    dict(layout=KVLayout(32, 8, 128, "bfloat16", 16, "mla")),
    dict(tp_rank=1, tp_size=2),
    dict(tenant="acme"),
    dict(lora="adapter-1"),
    dict(salt="per-user-salt"),
])
def test_namespaces_separate(change):
    fields = dict(model=NS.model, layout=NS.layout, tp_rank=NS.tp_rank, tp_size=NS.tp_size,
                  tenant=NS.tenant, lora=NS.lora, salt=NS.salt)
    fields.update(change)
    other = Namespace(**fields)
    toks = list(range(64))
    assert other.root != NS.root
    assert not set(other.keys(toks)) & set(NS.keys(toks))
    assert other.engine_keys([b"h"]) != NS.engine_keys([b"h"])


def test_namespace_validation():
    with pytest.raises(ValueError, match="model"):
        Namespace("", LLAMA)
    with pytest.raises(ValueError, match="tp_rank"):
        Namespace("m", LLAMA, tp_rank=2, tp_size=2)


def test_engine_hash_types():
    with pytest.raises(ValueError):
        engine_keys(NS.root, [2**130])
    with pytest.raises(TypeError):
        engine_keys(NS.root, ["a string"])


def test_key_packing_round_trip():
    keys = NS.keys(list(range(64))) + [b"\x00" * 16, b"ab" + b"\x00" * 14]
    assert split_keys(pack_keys(keys)) == keys
    with pytest.raises(ValueError):
        pack_keys([b"short"])
