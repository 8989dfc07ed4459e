"""The NVMe tier through a real `kvpool serve --nvme`: demotion, promotion, restarts,
corruption, a full disk and write-through. Real files, real processes, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
import xxhash

from kvpool import Client, errors
from kvpool.node.catalog import NvmeCatalog
from kvpool.rpc.v1 import admin_pb2, common_pb2
from kvpool.tiers.nvme import NvmeArena
from tests.conftest import start_serve
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks, wait_for
from tests.integration.rpc_helpers import stubs

BLOCK = SMALL.block_bytes  # 16 KiB, a multiple of 4 KiB: O_DIRECT-friendly


def stats(address: str) -> common_pb2.StatsResponse:
    with stubs(address) as (_, admin):
        return admin.Stats(common_pb2.StatsRequest())


def tier(s: common_pb2.StatsResponse, name: str) -> common_pb2.TierStats:
    return next(t for t in s.tiers if t.tier == name)


def evict_all(address: str) -> admin_pb2.EvictResponse:
    with stubs(address) as (_, admin):
        return admin.Evict(admin_pb2.EvictRequest(all=True), timeout=60)


def test_demote_then_promote_on_hit(serve_factory):
    sp = serve_factory("--nvme", "16MiB")
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(8)]
    data = random_blocks(8)
    with Client(sp.address, ns) as c:
        c.put_blocks(keys, data)
        assert evict_all(sp.address).blocks == 8
        s = stats(sp.address)
        assert s.demoted_blocks == 8 and tier(s, "dram").blocks == 0 and tier(s, "nvme").blocks == 8
        assert c.lookup(keys) == 8                       # still a hit: the pool has them
        got = c.get_blocks(keys)                         # promoted, checksums verified
        assert [bytes(g) for g in got] == [d.tobytes() for d in data]
        s = stats(sp.address)
        assert s.promoted_blocks == 8 and tier(s, "dram").blocks == 8 and tier(s, "nvme").blocks == 8
    r = subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", sp.address, "stats"],
                       capture_output=True, text=True, timeout=60)
    assert "demotions" in r.stdout and "nvme" in r.stdout


def test_restart_after_kill_9_serves_the_same_bytes(tmp_path):
    ns = fresh_namespace()
    toks = list(range(16 * 6))
    data = random_blocks(6, seed=5)
    first = start_serve(tmp_path, "--nvme", "16MiB")
    try:
        with Client(first.address, ns) as c:
            c.publish(toks, data)
        evict_all(first.address)
    finally:
        first.stop(signal.SIGKILL)
    os.unlink(first.shm_path)  # kill -9 leaves the shm segment behind; the data dir is what matters
    second = start_serve(tmp_path, "--nvme", "16MiB")
    try:
        assert "recovered 6 block(s)" in second.log()
        with Client(second.address, ns) as c:
            assert c.match(toks) == 6
            out = bytearray(6 * BLOCK)
            assert c.fetch(toks, out) == 6
            assert bytes(out) == data.tobytes()
    finally:
        second.stop()


def _catalog_is_consistent(data_dir) -> int:
    """Every catalog entry's bytes pass their checksum. Returns the entry count."""
    arena = NvmeArena(str(data_dir), 64 << 20)
    catalog = NvmeCatalog(os.path.join(data_dir, "nvme"))
    try:
        entries = catalog.load_verified(arena.capacity, chunk_bytes=arena.slots.chunk_bytes)
        for e in entries:
            buf = bytearray(e.size)
            arena.read_into(e.slot, buf)
            assert xxhash.xxh3_64_intdigest(buf) == e.checksum, f"catalog entry {e.key.hex()} has bad bytes"
        return len(entries)
    finally:
        catalog.close()
        arena.close()


def test_kill_9_during_demotion_leaves_no_bad_catalog_entry(tmp_path):
    ns = fresh_namespace()
    sp = start_serve(tmp_path, "--nvme", "64MiB", "--dram", "64MiB")
    try:
        with Client(sp.address, ns) as c:
            for i in range(0, 1024, 128):
                c.put_blocks([os.urandom(16) for _ in range(128)], random_blocks(128, seed=i))
        # Start demoting 16 MiB of blocks and kill the process while it is at it.
        t = threading.Thread(target=lambda: _ignore(evict_all, sp.address), daemon=True)
        t.start()
        assert wait_for(lambda: os.path.exists(os.path.join(tmp_path, "data", "nvme")), timeout=10)
        threading.Event().wait(0.15)
    finally:
        sp.stop(signal.SIGKILL)
        if os.path.exists(sp.shm_path):
            os.unlink(sp.shm_path)
    n = _catalog_is_consistent(tmp_path / "data")
    assert 0 <= n <= 1024
    # And a restart serves exactly what the catalog holds.
    again = start_serve(tmp_path, "--nvme", "64MiB", "--dram", "64MiB")
    try:
        assert stats(again.address).blocks == n
    finally:
        again.stop()


def _ignore(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass


def test_flipped_byte_on_disk_is_never_served(tmp_path):
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(3)]
    sp = start_serve(tmp_path, "--nvme", "16MiB")
    try:
        with Client(sp.address, ns) as c:
            c.put_blocks(keys, random_blocks(3))
            evict_all(sp.address)
            with stubs(sp.address) as (_, admin):
                victim = admin.Inspect(admin_pb2.InspectRequest(key=keys[1])).block
            assert victim.tier == common_pb2.TIER_NVME
            with open(tmp_path / "data" / "nvme" / "slots.bin", "r+b") as f:
                f.seek(victim.offset + 100)
                byte = f.read(1)
                f.seek(victim.offset + 100)
                f.write(bytes([byte[0] ^ 0xFF]))
            with pytest.raises(errors.BlockNotFound):
                c.get_blocks(keys)
            got = c.get_blocks(keys, allow_missing=True)
            assert got[1] is None and bytes(got[0]) == random_blocks(3)[0].tobytes()
            assert c.lookup(keys) == 1                    # the prefix now ends at the bad block
            s = stats(sp.address)
            assert s.corrupt_blocks == 1
        body = urllib.request.urlopen(sp.metrics_url, timeout=5).read().decode()
        assert "kvpool_corrupt_blocks_total 1.0" in body
        assert "failed its checksum" in sp.log()
    finally:
        sp.stop()


def test_full_nvme_evicts_by_policy_without_losing_its_books(serve_factory):
    # DRAM holds 16 blocks, NVMe 32: 80 blocks in, the pool keeps a consistent subset.
    sp = serve_factory("--dram", "256KiB", "--nvme", "512KiB", "--slab-bytes", "256KiB")
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(80)]
    with Client(sp.address, ns) as c:
        for i in range(0, 80, 8):
            c.put_blocks(keys[i : i + 8], random_blocks(8, seed=i))
            evict_all(sp.address)
        # Demotions started by the last eviction may still be landing: the books must agree
        # once the pool is quiet (and never lose a block that is still listed).
        seen = {}

        def books_agree() -> bool:
            seen["stats"] = stats(sp.address)
            seen["present"] = [k for k in keys if c.lookup([k])]
            return len(seen["present"]) == seen["stats"].blocks == stats(sp.address).blocks

        wait_for(books_agree, timeout=10)
        s, present = seen["stats"], seen["present"]
        assert tier(s, "nvme").used_bytes <= tier(s, "nvme").capacity_bytes
        assert 16 <= s.blocks <= 48
        assert len(present) == s.blocks
        for k in present[:8]:                             # what is listed can be read
            i = keys.index(k)
            assert bytes(c.get_blocks([k])[0]) == random_blocks(8, seed=i - i % 8)[i % 8].tobytes()


def test_write_through_survives_kill_9(tmp_path):
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(4)]
    data = random_blocks(4, seed=9)
    sp = start_serve(tmp_path, "--nvme", "16MiB", "--write-through", "true")
    try:
        with Client(sp.address, ns) as c:
            c.put_blocks(keys, data)
        assert wait_for(lambda: stats(sp.address).written_through_blocks == 4, timeout=10)
        assert tier(stats(sp.address), "dram").blocks == 4    # DRAM copies stay
    finally:
        sp.stop(signal.SIGKILL)
        os.unlink(sp.shm_path)
    again = start_serve(tmp_path, "--nvme", "16MiB")
    try:
        with Client(again.address, ns) as c:
            assert [bytes(b) for b in c.get_blocks(keys)] == [d.tobytes() for d in data]
    finally:
        again.stop()


def test_dram_watermark_demotes_in_the_background(serve_factory):
    sp = serve_factory("--dram", "512KiB", "--nvme", "4MiB", "--slab-bytes", "256KiB",
                       "--high-watermark", "0.75", "--low-watermark", "0.5")
    ns = fresh_namespace()
    keys = [os.urandom(16) for _ in range(60)]
    with Client(sp.address, ns) as c:
        for i in range(0, 60, 6):
            c.put_blocks(keys[i : i + 6], random_blocks(6, seed=i))
            wait_for(lambda: tier(stats(sp.address), "dram").used_bytes <= 0.75 * 512 * 1024, timeout=5)
        s = stats(sp.address)
        assert s.demoted_blocks > 0 and s.blocks == 60      # nothing lost: NVMe has room
        assert c.lookup(keys) == 60
        assert bytes(c.get_blocks(keys[:1])[0]) == random_blocks(6, seed=0)[0].tobytes()


def test_write_through_without_nvme_is_refused():
    r = subprocess.run([sys.executable, "-m", "kvpool", "serve", "--port", "0", "--write-through", "true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs an NVMe tier" in r.stderr
