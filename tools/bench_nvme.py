"""Benchmark: NVMe demote/promote through the node's real TierMover vs the disk's own bandwidth.

One run measures, in the same directory on the same filesystem:

1. **demote**: ``--size`` bytes of ``--block``-byte blocks go DRAM arena -> NVMe arena through
   ``TierMover.demote`` in batches of ``--batch`` blocks (each batch: vectored writes in the
   mover's thread pool, one fdatasync, one LMDB commit);
2. **promote**: the same blocks come back NVMe -> DRAM through ``TierMover.promote``, every
   xxh3-64 checksum verified (included in the time);
3. **disk write**: the first ``--size`` bytes of the same preallocated file (the arena's slot
   file, between rounds, so both sides hit the same extents and host cache state) written
   sequentially with O_DIRECT in ``--disk-buffer``-byte aligned requests, with one fdatasync
   per ``--batch`` blocks' worth of bytes (the same durability the mover pays), once with one
   request in flight (like ``dd oflag=direct``) and once with ``--disk-depth`` in flight
   (like fio's iodepth);
4. **disk read**: the same file read back sequentially with O_DIRECT, at both depths.

Reads are taken twice per round, interleaved with the other side's (promote, disk reads,
then the reverse), because the shared virtual disk of a development VM swings by 2x or more
from one second to the next. Disk writes always run before the demotion they are compared
with (they overwrite its blocks).

The disk's ceiling is the faster depth of each. The mover keeps several requests in flight,
so comparing it with a single-stream ``dd`` alone would flatter it on a virtual or NVMe disk.

The page cache is kept out by O_DIRECT (and POSIX_FADV_DONTNEED before each read phase).
When the filesystem refuses O_DIRECT the output says so: buffered numbers are not comparable.
Each phase runs ``--repeat`` times and the best run counts, for every phase alike.

The last line of stdout is JSON (docs/design.md §6):
``{"bench":"nvme","demote_gbps":…,"promote_gbps":…,"disk_write_gbps":…,"disk_read_gbps":…,
"demote_ratio":…,"promote_ratio":…}`` (GB/s are 1e9 bytes per second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvpool.node.catalog import NvmeCatalog
from kvpool.node.mover import DemoteItem, PromoteItem, TierMover, checksum
from kvpool.tiers.dram import DramArena
from kvpool.tiers.nvme import DIRECT_ALIGN, NvmeArena

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_size(text: str) -> int:
    """``2GiB``, ``2G``, ``512MiB``, ``4096`` -> bytes (binary units)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower()
    for suffix in ("ib", "b"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def fs_type(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()[1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def default_dir() -> str:
    """A directory on a real disk: the repo's ./data (git-ignored) unless it sits on tmpfs."""
    for base in (os.path.join(REPO, "data"), "/var/tmp", tempfile.gettempdir()):
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            continue
        if fs_type(base) not in ("tmpfs", "ramfs", "overlay"):
            return base
    return tempfile.gettempdir()


def fill(dram: DramArena, slots, seed: int = 0) -> list[int]:
    """Fill the DRAM slots with distinct pseudo-random bytes; returns their checksums."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 256, size=64 << 20, dtype=np.uint8)
    sums = []
    for n, s in enumerate(slots):
        dst = dram.array[s.offset : s.offset + s.size]
        start = (n * 4099) % (len(pattern) - s.size) if s.size < len(pattern) else 0
        k = min(s.size, len(pattern))
        dst[:k] = pattern[start : start + k]
        if s.size > k:
            dst[k:] = 7
        dst[:8] = np.frombuffer(n.to_bytes(8, "little"), dtype=np.uint8)
        sums.append(checksum(dram.view(s)))
    return sums


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def _batches(n: int, batch: int, inflight: int, run_one) -> None:
    """Run ``run_one(range)`` over ``n`` items in batches, ``inflight`` batches at a time."""
    gate = asyncio.Semaphore(inflight)

    async def one(i):
        async with gate:
            await run_one(range(i, min(i + batch, n)))

    await asyncio.gather(*(one(i) for i in range(0, n, batch)))


class MoverSide:
    """The node's path: DRAM arena <-> NvmeArena through the real TierMover, in batches."""

    def __init__(self, dram, nvme, catalog, mover, nblocks, block, batch, inflight):
        self.dram, self.nvme, self.catalog, self.mover = dram, nvme, catalog, mover
        self.block, self.batch, self.inflight = block, batch, inflight
        self.keys = [i.to_bytes(16, "big") for i in range(nblocks)]
        self.placed: list = []
        self.targets: list = []
        self.sums: list[int] = []

    async def release(self) -> None:
        """Drop the NVMe copies and free the DRAM slots of the last round."""
        if self.placed:
            await self.mover.drop(self.placed)
            for s in self.targets:
                self.dram.free(s)
            self.placed, self.targets = [], []
        assert self.nvme.used_bytes == 0 and len(self.catalog) == 0

    async def demote(self) -> float:
        """Demote every block (after dropping the last round's copies, untimed)."""
        await self.release()
        slots = [self.dram.allocate(self.block) for _ in self.keys]
        self.sums = fill(self.dram, slots)
        self.placed = [None] * len(self.keys)

        async def one(idx):
            res = await self.mover.demote(
                [DemoteItem(self.keys[j], slots[j], self.sums[j], "bench") for j in idx])
            if res.no_space or res.failed:
                raise SystemExit(f"demotion failed: no_space={len(res.no_space)} "
                                 f"failed={res.failed[:3]}")
            for j, moved in zip(idx, res.moved):
                self.placed[j] = moved

        t = time.perf_counter()
        await _batches(len(self.keys), self.batch, self.inflight, one)
        elapsed = time.perf_counter() - t
        for s in slots:  # as the node does after a demotion; promotions land in fresh slots
            self.dram.free(s)
        self.targets = [self.dram.allocate(self.block) for _ in self.keys]
        return elapsed

    async def promote(self) -> float:
        """Promote every block into DRAM, checksums verified; the NVMe copies stay."""
        drop_cache(self.nvme.path)

        async def one(idx):
            res = await self.mover.promote([PromoteItem(self.placed[j][0], self.placed[j][1],
                                                        self.sums[j], self.targets[j])
                                            for j in idx])
            if res.corrupt or len(res.promoted) != len(idx):
                raise SystemExit(f"promotion found corrupt blocks: {res.corrupt[:3]}")

        t = time.perf_counter()
        await _batches(len(self.keys), self.batch, self.inflight, one)
        return time.perf_counter() - t


class DiskSide:
    """The disk's own sequential O_DIRECT bandwidth on one preallocated file.

    ``depth`` requests of ``buf_bytes`` are in flight at once (1: a plain loop, as ``dd``
    does; more: what a virtual or NVMe disk needs to reach its bandwidth, as fio's iodepth).
    Requests are issued in file order either way. Writes fdatasync every ``sync_every``
    bytes, as the mover does once per batch.
    """

    def __init__(self, path: str, size: int, buf_bytes: int, sync_every: int, depth: int):
        self.path, self.size, self.buf_bytes = path, size, buf_bytes
        self.per_sync = max(1, sync_every // buf_bytes)
        self.bufs = [mmap.mmap(-1, buf_bytes) for _ in range(depth)]  # page aligned
        for b in self.bufs:
            np.frombuffer(b, dtype=np.uint8)[:] = np.random.default_rng(1).integers(
                0, 256, size=buf_bytes, dtype=np.uint8)
        self.direct = True
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError:
            self.direct = False
            self.fd = os.open(path, os.O_RDWR)
        self.pool = ThreadPoolExecutor(depth)
        self.pieces = [(k, off, min(buf_bytes, size - off))
                       for k, off in enumerate(range(0, size, buf_bytes))]

    def _run(self, op, depth: int, group, spread=None) -> None:
        """``spread``: a flat buffer of the file's size; piece k lands at its own offset."""
        if spread is not None:
            bufs = [spread[off : off + n] for _, off, n in group]
            group = [(k, off, n) for k, (_, off, n) in enumerate(group)]
        else:
            bufs = self.bufs
        if depth == 1:
            for k, off, n in group:
                op(self.fd, [memoryview(bufs[k % len(bufs)])[:n]], off)
            return
        gate = threading.Semaphore(depth)

        def one(piece):
            k, off, n = piece
            try:
                op(self.fd, [memoryview(bufs[k % len(bufs)])[:n]], off)
            finally:
                gate.release()

        futs = []
        for piece in group:
            gate.acquire()
            futs.append(self.pool.submit(one, piece))
        for f in futs:
            f.result()

    def write(self, depth: int) -> float:
        t = time.perf_counter()
        for g in range(0, len(self.pieces), self.per_sync):
            self._run(os.pwritev, depth, self.pieces[g : g + self.per_sync])
            os.fdatasync(self.fd)
        return time.perf_counter() - t

    def read(self, depth: int, *, spread=None) -> float:
        drop_cache(self.path)
        t = time.perf_counter()
        self._run(os.preadv, depth, self.pieces, spread)
        return time.perf_counter() - t

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)
        for b in self.bufs:
            b.close()


async def aiofiles_round(dram, path, keys, block, batch):
    """The same demote/promote pattern through aiofiles (seek + write/readinto per block)."""
    import aiofiles

    slots = [dram.allocate(block) for _ in keys]
    fill(dram, slots)
    loop = asyncio.get_running_loop()
    opener = lambda p, flags: os.open(p, flags | os.O_DIRECT)  # noqa: E731
    size = block * len(keys)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, size)
    os.close(fd)
    async with aiofiles.open(path, "r+b", buffering=0, opener=opener) as f:
        t = time.perf_counter()
        for i, s in enumerate(slots):
            await f.seek(i * block)
            await f.write(dram.view(s))
            if (i + 1) % batch == 0 or i + 1 == len(slots):
                await loop.run_in_executor(None, os.fdatasync, f.fileno())
        t_w = time.perf_counter() - t
        drop_cache(path)
        t = time.perf_counter()
        for i, s in enumerate(slots):
            await f.seek(i * block)
            await f.readinto(dram.view(s))
            checksum(dram.view(s))
        t_r = time.perf_counter() - t
    for s in slots:
        dram.free(s)
    os.unlink(path)
    return t_w, t_r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="directory on the disk to measure "
                    "(default: ./data in the repo, or /var/tmp, avoiding tmpfs)")
    ap.add_argument("--size", default="2GiB", help="bytes to move each way (default 2GiB)")
    ap.add_argument("--block", default="2MiB", help="block size (default 2MiB)")
    ap.add_argument("--batch", type=int, default=64, help="blocks per demote/promote batch")
    ap.add_argument("--inflight", type=int, default=2,
                    help="batches in flight at once (a demotion sweeper or concurrent requests)")
    ap.add_argument("--io-threads", type=int, default=8, help="mover I/O threads")
    ap.add_argument("--run-bytes", default="16MiB", help="mover: adjacent slots per system call")
    ap.add_argument("--disk-buffer", default="16MiB", help="request size of the disk baseline")
    ap.add_argument("--disk-depth", type=int, default=8,
                    help="requests in flight for the deep disk baseline (the shallow one is 1); "
                         "the faster of the two is the ceiling")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of every phase; best counts")
    ap.add_argument("--aiofiles", action="store_true",
                    help="also time the same pattern through aiofiles, for comparison")
    args = ap.parse_args(argv)

    size, block = parse_size(args.size), parse_size(args.block)
    disk_buf = parse_size(args.disk_buffer)
    if block % DIRECT_ALIGN or size % block:
        ap.error(f"--block must be a multiple of {DIRECT_ALIGN} and divide --size")
    base = args.dir or default_dir()
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-nvme-", dir=base)
    fstype = fs_type(work)
    print(f"bench_nvme: {size / 2**30:.2f} GiB of {block >> 10} KiB blocks, batches of "
          f"{args.batch} ({args.inflight} in flight), {args.io_threads} I/O threads, in {work} "
          f"({fstype})", flush=True)
    if fstype in ("tmpfs", "ramfs", "overlay"):
        print(f"bench_nvme: WARNING {work} is on {fstype}, not a disk", flush=True)

    nblocks = size // block
    chunk = max(block, (64 << 20) // block * block)
    dram = nvme = catalog = mover = None
    best = {"demote": 0.0, "promote": 0.0, "write": 0.0, "read": 0.0}
    try:
        dram = DramArena(size + chunk, chunk_bytes=chunk)
        nvme = NvmeArena(work, size + chunk, chunk_bytes=chunk)
        catalog = NvmeCatalog(work)
        mover = TierMover(dram, nvme, catalog, io_threads=args.io_threads,
                           max_run_bytes=parse_size(args.run_bytes))
        if not nvme.direct:
            print(f"bench_nvme: NVMe arena is BUFFERED ({nvme.direct_reason}); numbers include "
                  "the page cache", flush=True)
        side = MoverSide(dram, nvme, catalog, mover, nblocks, block, args.batch, args.inflight)
        # The disk side uses the NVMe arena's own slot file (the blocks occupy its first
        # `size` bytes): the same file, extents and host cache state for both sides. A virtual
        # disk caches per file on the host, and two files can differ by 3x in the same second.
        disk = DiskSide(nvme.path, size, disk_buf, args.batch * block, args.disk_depth)
        if not disk.direct:
            print("bench_nvme: disk baseline is BUFFERED (no O_DIRECT here)", flush=True)
        depths = sorted({1, args.disk_depth})
        for r in range(args.repeat):
            # Alternate the order, so that neither side always runs first on an idle disk (a
            # virtual disk keeps flushing the previous phase's writes on the host). Reads
            # change nothing, so each is taken twice, interleaved with the other side's.
            w, rd = {}, {}
            # Disk writes go first (they overwrite the blocks); the demotion then runs while
            # the host may still be flushing them, which if anything handicaps the mover.
            writes = [*depths, "mover"] if r % 2 == 0 else [*depths[::-1], "mover"]
            for phase in writes:
                w[phase] = size / (asyncio.run(side.demote()) if phase == "mover"
                                   else disk.write(phase))
            for k in range(2):
                reads = writes[::-1] if (r + k) % 2 else writes
                for phase in reads:
                    got = size / (asyncio.run(side.promote()) if phase == "mover"
                                  else disk.read(phase))
                    rd[phase] = max(rd.get(phase, 0.0), got)
            print("bench_nvme: round %d: demote %.3f promote %.3f GB/s; disk write/read %s GB/s"
                  % (r, w["mover"] / 1e9, rd["mover"] / 1e9,
                     ", ".join(f"depth {d} {w[d] / 1e9:.3f}/{rd[d] / 1e9:.3f}" for d in depths)),
                  flush=True)
            # Not part of the ratio: the same disk read landing across the DRAM arena's whole
            # memory (2 GiB of shm pages, as promotion must) instead of a few reused buffers.
            arena_read = size / disk.read(args.disk_depth, spread=memoryview(dram.array)[:size])
            print("bench_nvme: round %d: diagnostic: the disk read at depth %d spread over the "
                  "DRAM arena: %.3f GB/s (promote is %.2f of that)"
                  % (r, args.disk_depth, arena_read / 1e9, rd["mover"] / arena_read), flush=True)
            best["demote"] = max(best["demote"], w.pop("mover"))
            best["promote"] = max(best["promote"], rd.pop("mover"))
            best["write"] = max(best["write"], *w.values())
            best["read"] = max(best["read"], *rd.values())
        disk.close()
        asyncio.run(side.release())
        if args.aiofiles:
            tw, tr = asyncio.run(aiofiles_round(dram, os.path.join(work, "aiofiles.bin"),
                                                side.keys, block, args.batch))
            print("bench_nvme: aiofiles (seek+write / seek+readinto per block, O_DIRECT): "
                  "write %.3f read %.3f GB/s" % (size / tw / 1e9, size / tr / 1e9), flush=True)
        print("bench_nvme: mover stats " + json.dumps(mover.stats.as_dict()), flush=True)
    finally:
        for thing in (mover, catalog, nvme, dram):
            if thing is not None:
                thing.close()
        shutil.rmtree(work, ignore_errors=True)

    gb = {k: v / 1e9 for k, v in best.items()}
    print(json.dumps({
        "bench": "nvme",
        "demote_gbps": round(gb["demote"], 3),
        "promote_gbps": round(gb["promote"], 3),
        "disk_write_gbps": round(gb["write"], 3),
        "disk_read_gbps": round(gb["read"], 3),
        "demote_ratio": round(gb["demote"] / gb["write"], 3),
        "promote_ratio": round(gb["promote"] / gb["read"], 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
