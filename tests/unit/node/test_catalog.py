"""NvmeCatalog on a real LMDB: CRUD, persistence, growth, and the restart checks."""

from __future__ import annotations

import logging

import lmdb
import pytest

from kvpool.node.catalog import CATALOG_DIR, CatalogEntry, NvmeCatalog

MiB = 1 << 20


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def entry(i: int, offset: int, size: int = MiB, ns: str = "ns-a") -> CatalogEntry:
    return CatalogEntry(key(i), offset, size, 0x1000 + i, ns)


def test_put_get_iterate_delete(tmp_path):
    with NvmeCatalog(str(tmp_path)) as cat:
        entries = [entry(i, i * MiB, ns=f"ns-{i % 2}") for i in range(10)]
        cat.put_many(entries)
        assert len(cat) == 10
        assert cat.get(key(3)) == entries[3]
        assert cat.get(key(3)).slot == (3 * MiB, MiB)
        assert cat.get(key(99)) is None
        assert key(4) in cat and key(99) not in cat
        assert sorted(cat, key=lambda e: e.offset) == entries
        assert cat.get_many([key(1), key(50)]) == [entries[1], None]
        assert cat.delete_many([key(1), key(2), key(50)]) == 2
        assert len(cat) == 8 and cat.get(key(1)) is None
        cat.put_many([entry(3, 20 * MiB)])  # replace
        assert cat.get(key(3)).offset == 20 * MiB and len(cat) == 8
        with pytest.raises(ValueError):
            cat.put_many([CatalogEntry(b"short", 0, MiB, 1, "")])


def test_survives_reopen(tmp_path):
    with NvmeCatalog(str(tmp_path)) as cat:
        cat.put_many([entry(i, i * MiB, ns="模型/ns") for i in range(5)])
    with NvmeCatalog(str(tmp_path)) as cat:
        assert len(cat) == 5
        assert cat.get(key(2)) == entry(2, 2 * MiB, ns="模型/ns")


def test_map_grows(tmp_path):
    with NvmeCatalog(str(tmp_path), map_size=256 << 10) as cat:
        start = cat._env.info()["map_size"]
        big_ns = "n" * 400
        for batch in range(4):
            cat.put_many(entry(batch * 1000 + i, (batch * 1000 + i) * 4096, 4096, big_ns)
                         for i in range(1000))
        assert len(cat) == 4000
        assert cat._env.info()["map_size"] > start
        assert cat.get(key(3999)).namespace == big_ns


def test_load_verified_drops_bad_entries(tmp_path, caplog):
    cap = 64 * MiB
    good = [entry(1, 0), entry(2, MiB), entry(3, 8 * MiB, 4 * MiB)]
    bad = [
        entry(10, 60 * MiB, 8 * MiB),   # runs past the end of the arena
        entry(11, 64 * MiB),            # starts at the end
        CatalogEntry(key(12), 2 * MiB, 0, 1, ""),  # empty
        entry(13, 20 * MiB + 4096),     # off the 1 MiB grid
        entry(14, 30 * MiB, 2 * MiB), entry(15, 31 * MiB),  # each on a grid, but overlapping
        entry(16, 16 * MiB, 32 * MiB),  # larger than a chunk
    ]
    with NvmeCatalog(str(tmp_path)) as cat:
        cat.put_many(good + bad)
    # A value this version cannot read, and a key of the wrong length, written behind its back.
    env = lmdb.open(str(tmp_path / CATALOG_DIR), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(key(20), b"\x09garbage-value-of-another-version....")
        txn.put(b"k" * 15, entry(21, 40 * MiB).encode())
    env.close()

    with NvmeCatalog(str(tmp_path)) as cat, caplog.at_level(logging.WARNING):
        kept = cat.load_verified(cap, chunk_bytes=16 * MiB)
        assert kept == good  # sorted by offset
        assert len(cat) == len(good)
        dropped = [r for r in caplog.records if "dropping block" in r.getMessage()]
        assert len(dropped) == len(bad) + 2
    with NvmeCatalog(str(tmp_path)) as cat:  # the drops were durable
        assert sorted(e.key for e in cat) == [e.key for e in good]


def test_load_verified_without_grid_and_nested_overlap(tmp_path):
    with NvmeCatalog(str(tmp_path)) as cat:
        cat.put_many([entry(1, 0, 10 * MiB), entry(2, 2 * MiB, MiB), entry(3, 4 * MiB, MiB),
                      entry(4, 12 * MiB, 4096 * 3)])
        kept = cat.load_verified(32 * MiB)
        assert [e.key for e in kept] == [key(4)]


def test_delete_matching_only_removes_the_named_slot(tmp_path):
    with NvmeCatalog(str(tmp_path)) as cat:
        cat.put_many([entry(1, 0), entry(2, MiB)])
        assert cat.delete_matching([(key(1), (5 * MiB, MiB)), (key(2), (MiB, MiB)),
                                    (key(9), (0, MiB))]) == [False, True, False]
        assert cat.get(key(1)) is not None and cat.get(key(2)) is None
