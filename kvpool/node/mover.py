"""The tier mover: copies blocks between the DRAM arena and the NVMe arena, in batches.

Protocol (the node drives it; the mover never decides *what* moves):

* ``demote(batch)`` / ``write_through(batch)``: for items ``(key, dram_slot, checksum,
  namespace)`` the mover allocates NVMe slots, writes the DRAM bytes straight from arena
  memory to disk, ``fdatasync``s once, and then commits one catalog transaction for the
  batch. It returns a :class:`DemoteResult`. The DRAM slots are never freed here: after a
  demotion the node frees the ones in ``result.moved`` (if no lease holds them); after a
  write-through it keeps them.
* ``promote(batch)``: for items ``(key, nvme_slot, checksum, dram_slot)`` the mover reads
  the bytes straight into the DRAM slots and verifies every xxh3-64 checksum. A block that
  fails (or cannot be read) is dropped from NVMe: catalog entry deleted, then its slot freed;
  it is logged, counted and listed in ``result.corrupt``. Its DRAM slot holds garbage and is
  the caller's to free. Only keys in ``result.promoted`` may be served.
* ``drop(items)``: remove blocks from NVMe (eviction): catalog entries first, then slots.
  Only an entry that still names the given slot goes, so a stale slot is harmless.
* Demoting a block that is already on NVMe with the same checksum costs no I/O; with other
  bytes it is written to a new slot and the old slot is freed once the entry moved.
* ``recover()``: at start, claim the NVMe slots of the catalog's verified entries.

Invariants:

* Outside a running batch, an NVMe slot is allocated if and only if a catalog entry names it.
* A catalog entry exists only for bytes that were durable before it was committed.
* A catalog entry is deleted before its slot is freed, so a reused slot is never named by
  a stale entry.
* A full NVMe tier (no free slot, or ENOSPC from the disk) is a result, not a crash:
  ``result.no_space`` lists the keys that did not move, their NVMe slots are freed, no
  catalog entry is written for them, and their DRAM copies are untouched. The caller
  decides whether to evict from NVMe and retry.
* Allocation and free in the arenas happen on the event loop's thread; only byte movement,
  ``fdatasync`` and catalog commits run in the executor. So one mover serves one loop.

Why a thread pool around ``os.preadv``/``os.pwritev`` and not ``aiofiles``: aiofiles runs
each file-object call in the default executor too, but it has no positional vectored I/O, so
a block costs a ``seek`` and a ``write``/``readinto`` (two executor hops on a shared file
position, which forbids concurrency on one descriptor), and it cannot coalesce adjacent
slots into one system call. Measured with ``tools/bench_nvme.py --aiofiles --repeat 1`` on
the 2-core development VM (2 GiB of 2 MiB blocks, O_DIRECT, ext4 on a virtio disk), two runs:
this pool wrote 1.10 and 0.84 GB/s and read (checksums included) 3.03 and 3.22 GB/s; aiofiles
wrote 0.82 and 0.64 GB/s and read 2.01 and 2.11 GB/s. So the pool is what we ship.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import xxhash

from kvpool.node.catalog import CatalogEntry, NvmeCatalog
from kvpool.tiers.base import Arena, Slot
from kvpool.tiers.moves import DemoteResult, PromoteResult
from kvpool.tiers.nvme import NvmeArena

__all__ = [
    "TierMover",
    "DemoteItem",
    "PromoteItem",
    "DemoteResult",
    "PromoteResult",
    "MoverStats",
    "checksum",
]

log = logging.getLogger(__name__)

#: Adjacent slots are coalesced into one system call up to this many bytes.
MAX_RUN_BYTES = 16 << 20
#: Worker threads of the mover's own executor: enough I/O in flight to keep a disk busy.
DEFAULT_IO_THREADS = 8


def checksum(buf) -> int:
    """A block's checksum: xxh3-64 of its bytes (docs/design.md §3)."""
    return xxhash.xxh3_64_intdigest(buf)


class DemoteItem(NamedTuple):
    key: bytes
    dram_slot: Slot
    checksum: int
    namespace: str = ""


class PromoteItem(NamedTuple):
    key: bytes
    nvme_slot: Slot
    checksum: int
    dram_slot: Slot


@dataclass
class MoverStats:
    """Cumulative counters of one mover (the node exports them as metrics)."""

    batches: int = 0
    demoted_blocks: int = 0
    demoted_bytes: int = 0
    written_through_blocks: int = 0
    written_through_bytes: int = 0
    promoted_blocks: int = 0
    promoted_bytes: int = 0
    corrupt_blocks: int = 0
    no_space_blocks: int = 0
    io_errors: int = 0
    dropped_blocks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Run(NamedTuple):
    """Items whose NVMe slots are back to back: one vectored system call."""

    offset: int
    indices: list[int]  # positions in the batch
    nbytes: int


def _runs(offsets: Sequence[tuple[int, int, int]], max_bytes: int = MAX_RUN_BYTES) -> list[_Run]:
    """Group (batch index, nvme offset, size) into contiguous runs of <= ``max_bytes``."""
    runs: list[_Run] = []
    cur: list[int] = []
    start = end = -1
    for i, off, size in sorted(offsets, key=lambda t: t[1]):
        if cur and off == end and end + size - start <= max_bytes:
            cur.append(i)
            end += size
            continue
        if cur:
            runs.append(_Run(start, cur, end - start))
        cur, start, end = [i], off, off + size
    if cur:
        runs.append(_Run(start, cur, end - start))
    return runs


class TierMover:
    """Moves blocks between ``dram`` (an ADDRESSABLE arena) and ``nvme`` with ``catalog``.

    ``executor``: where blocking I/O runs; by default a private pool of
    ``DEFAULT_IO_THREADS`` threads, shut down by :meth:`close`.
    """

    def __init__(self, dram: Arena, nvme: NvmeArena, catalog: NvmeCatalog,
                 executor: Executor | None = None, *, io_threads: int = DEFAULT_IO_THREADS,
                 max_run_bytes: int = MAX_RUN_BYTES) -> None:
        self.dram = dram
        self.nvme = nvme
        self.catalog = catalog
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(io_threads, thread_name_prefix="kvpool-io")
        self.max_run_bytes = max_run_bytes
        self.stats = MoverStats()

    # -- restart ---------------------------------------------------------------------------

    def recover(self) -> list[CatalogEntry]:
        """Claim the NVMe slots of the catalog's verified entries; returns those entries.

        Call once at start, before any demotion, on a fresh arena. Entries that fail the
        catalog's cheap checks or that the arena cannot claim are deleted and logged.
        Blocking (an LMDB scan): run it before the loop serves, or in an executor.
        """
        entries = self.catalog.load_verified(self.nvme.capacity,
                                             chunk_bytes=self.nvme.slots.chunk_bytes)
        good, bad = [], []
        for e in entries:
            try:
                self.nvme.slots.claim(e.slot)
            except (ValueError, RuntimeError) as exc:
                log.warning("NVMe catalog: dropping block %s: %s", e.key.hex(), exc)
                bad.append(e.key)
            else:
                good.append(e)
        if bad:
            self.catalog.delete_many(bad)
        log.info("NVMe tier: recovered %d block(s), %d bytes, from %s",
                 len(good), sum(e.size for e in good), self.catalog.path)
        return good

    # -- DRAM -> NVMe ----------------------------------------------------------------------

    async def demote(self, batch: Sequence[DemoteItem]) -> DemoteResult:
        """Copy DRAM blocks to NVMe; the caller frees the DRAM slots of ``result.moved``."""
        return await self._to_nvme(batch, keep_dram=False)

    async def write_through(self, batch: Sequence[DemoteItem]) -> DemoteResult:
        """Copy committed DRAM blocks to NVMe and keep the DRAM copies (write-through)."""
        return await self._to_nvme(batch, keep_dram=True)

    async def _to_nvme(self, batch: Sequence[DemoteItem], keep_dram: bool) -> DemoteResult:
        abort = _Abort()
        return await _finish_even_if_cancelled(self._to_nvme_body(batch, keep_dram, abort), abort)

    async def _to_nvme_body(self, batch: Sequence[DemoteItem], keep_dram: bool,
                            abort: _Abort) -> DemoteResult:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        batch = [DemoteItem(*item) for item in batch]
        if len({item.key for item in batch}) != len(batch):
            raise ValueError("a demote batch names the same block twice")
        result = DemoteResult(keep_dram=keep_dram)
        # A block already on NVMe with the same bytes needs no I/O: report its slot.
        current = await loop.run_in_executor(self.executor, self.catalog.get_many,
                                             [item.key for item in batch])
        present: dict[int, Slot] = {}
        for i, (item, e) in enumerate(zip(batch, current)):
            if (e is not None and e.checksum == item.checksum and e.size == item.dram_slot.size
                    and self.nvme.slots.is_allocated(e.slot)):
                present[i] = e.slot
        slots: list[Slot | None] = []
        for i, item in enumerate(batch):
            if i in present:
                slots.append(None)
                continue
            slot = self.nvme.allocate(item.dram_slot.size)
            slots.append(slot)
            if slot is None:
                result.no_space.append(item.key)
        placed = [(i, s.offset, s.size) for i, s in enumerate(slots) if s is not None]
        errors: dict[int, OSError] = {}
        if placed:
            runs = _runs(placed, self.max_run_bytes)
            outcomes = await self._run_all(
                loop, [(self._write_run, run, batch) for run in runs])
            for run, exc in zip(runs, outcomes):
                if exc is not None:
                    errors.update((i, exc) for i in run.indices)
            if abort.set:  # the caller was cancelled: commit nothing, free everything
                errors.update((i, OSError(errno.ECANCELED, "cancelled")) for i, _, _ in placed)
            written = [i for i, _, _ in placed if i not in errors]
            if written:
                try:
                    replaced = await loop.run_in_executor(self.executor, self._commit, batch,
                                                          slots, written)
                except OSError as exc:
                    # fdatasync or the catalog commit failed: nothing of the batch is trusted.
                    errors.update((i, exc) for i in written)
                else:
                    # A block that was already on NVMe now names its new slot; the old one
                    # is no longer referenced by any entry, so it can be reused.
                    for old in replaced:
                        if self.nvme.slots.is_allocated(old.slot):
                            self.nvme.free(old.slot)
        for i, exc in errors.items():
            self.nvme.free(slots[i])
            slots[i] = None
            key = batch[i].key
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                result.no_space.append(key)
            elif exc.errno == errno.ECANCELED:
                result.failed.append((key, "cancelled"))
            else:
                result.failed.append((key, f"{exc.strerror or exc}"))
                self.stats.io_errors += 1
        if errors and not abort.set:
            log.warning("NVMe %s: %d of %d block(s) not written (%s)",
                        "write-through" if keep_dram else "demotion", len(errors), len(batch),
                        next(iter(errors.values())))
        fresh = []
        for i, (item, slot) in enumerate(zip(batch, slots)):
            if slot is not None:
                fresh.append((item.key, slot))
                result.moved.append((item.key, slot))
                result.bytes_moved += slot.size
            elif i in present:
                result.moved.append((item.key, present[i]))
        if abort.set and fresh:
            # Cancelled while the catalog commit ran: undo it, so the caller's view (nothing
            # new on NVMe) stays true.
            await self._drop_now(loop, fresh)
            result.moved, result.bytes_moved, fresh = [], 0, []
        self.stats.batches += 1
        self.stats.no_space_blocks += len(result.no_space)
        if keep_dram:
            self.stats.written_through_blocks += len(fresh)
            self.stats.written_through_bytes += result.bytes_moved
        else:
            self.stats.demoted_blocks += len(fresh)
            self.stats.demoted_bytes += result.bytes_moved
        result.seconds = loop.time() - t0
        return result

    def _write_run(self, run: _Run, batch: list[DemoteItem]) -> None:
        self.nvme.write_vectored(run.offset, [self.dram.view(batch[i].dram_slot)
                                              for i in run.indices])

    def _commit(self, batch: list[DemoteItem], slots: list[Slot | None],
                written: list[int]) -> list[CatalogEntry]:
        """fdatasync, then one catalog transaction; returns the entries it replaced."""
        # The durability order the catalog depends on: bytes first, entries second.
        self.nvme.sync()
        new = [CatalogEntry(batch[i].key, slots[i].offset, slots[i].size, batch[i].checksum,
                            batch[i].namespace) for i in written]
        old = self.catalog.get_many(e.key for e in new)
        self.catalog.put_many(new)
        return [o for o, n in zip(old, new) if o is not None and o.slot != n.slot]

    # -- NVMe -> DRAM ----------------------------------------------------------------------

    async def promote(self, batch: Sequence[PromoteItem], *,
                      keep_nvme: bool = True) -> PromoteResult:
        """Read NVMe blocks into DRAM slots and verify them; serve only ``result.promoted``.

        ``keep_nvme=False`` also drops the NVMe copies of the promoted blocks (catalog
        entries, then slots). The caller must hold the NVMe slots against eviction (leases)
        for the duration of the call. If the caller is cancelled, the reads in flight still
        finish (and corrupt blocks are still dropped) before the cancellation propagates.
        """
        abort = _Abort()
        return await _finish_even_if_cancelled(self._promote_body(batch, keep_nvme), abort)

    async def _promote_body(self, batch: Sequence[PromoteItem], keep_nvme: bool) -> PromoteResult:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        batch = [PromoteItem(*item) for item in batch]
        result = PromoteResult(kept_nvme=keep_nvme)
        for item in batch:
            if item.nvme_slot.size != item.dram_slot.size:
                raise ValueError(f"block {item.key.hex()}: NVMe slot {item.nvme_slot} and DRAM "
                                 f"slot {item.dram_slot} differ in size")
        runs = _runs([(i, it.nvme_slot.offset, it.nvme_slot.size) for i, it in enumerate(batch)],
                     self.max_run_bytes)
        outcomes = await self._run_all(loop, [(self._read_run, run, batch) for run in runs])
        bad: dict[int, str] = {}
        for run, out in zip(runs, outcomes):
            if isinstance(out, OSError):
                self.stats.io_errors += len(run.indices)
                bad.update((i, f"unreadable: {out.strerror or out}") for i in run.indices)
            else:
                bad.update(out)
        good = [i for i in range(len(batch)) if i not in bad]
        if bad:
            for i, reason in bad.items():
                log.error("NVMe block %s failed verification (%s): dropped, not served",
                          batch[i].key.hex(), reason)
            try:
                await self._drop_now(loop, [(batch[i].key, batch[i].nvme_slot) for i in bad])
            except OSError as exc:
                # The entries stay (and keep their slots); the next read fails them again.
                log.error("NVMe catalog: could not drop %d corrupt block(s): %s", len(bad), exc)
            result.corrupt = [(batch[i].key, reason) for i, reason in bad.items()]
            self.stats.corrupt_blocks += len(bad)
        if good and not keep_nvme:
            try:
                await self._drop_now(loop, [(batch[i].key, batch[i].nvme_slot) for i in good])
            except OSError as exc:
                result.kept_nvme = True  # still valid copies; the caller may drop them later
                log.warning("NVMe catalog: promoted blocks keep their NVMe copies: %s", exc)
        result.promoted = [batch[i].key for i in good]
        result.bytes_moved = sum(batch[i].nvme_slot.size for i in good)
        self.stats.batches += 1
        self.stats.promoted_blocks += len(good)
        self.stats.promoted_bytes += result.bytes_moved
        result.seconds = loop.time() - t0
        return result

    def _read_run(self, run: _Run, batch: list[PromoteItem]) -> dict[int, str]:
        """Read one run into its DRAM slots; returns {batch index: reason} for bad blocks."""
        views = [self.dram.view(batch[i].dram_slot) for i in run.indices]
        self.nvme.read_vectored(run.offset, views)
        bad = {}
        for i, view in zip(run.indices, views):
            got = checksum(view)
            if got != batch[i].checksum:
                bad[i] = f"checksum {got:016x} != {batch[i].checksum:016x}"
        return bad

    # -- removal ---------------------------------------------------------------------------

    async def drop(self, items: Sequence[tuple[bytes, Slot]]) -> int:
        """Remove blocks from NVMe (eviction): catalog entries first, then their slots.

        Only an entry that still names the given slot is removed (and only its slot freed);
        returns how many were. Raises ``OSError`` if the catalog cannot be updated (LMDB
        needs a little free disk even to delete); then no slot is freed and every entry
        still stands.
        """
        return await self._drop_now(asyncio.get_running_loop(), list(items))

    async def _drop_now(self, loop, items: list[tuple[bytes, Slot]]) -> int:
        """Delete the entries that still name these slots, then free exactly those slots."""
        if not items:
            return 0
        removed = await loop.run_in_executor(self.executor, self.catalog.delete_matching, items)
        # Only now, with the entries durably gone, may the slots be reused. A slot whose
        # entry was already gone or names another slot was freed when that happened.
        n = 0
        for (_, slot), gone in zip(items, removed):
            if gone:
                self.nvme.free(slot)
                n += 1
        self.stats.dropped_blocks += n
        return n

    # -- plumbing --------------------------------------------------------------------------

    async def _run_all(self, loop, calls) -> list:
        """Run blocking calls in the executor; each outcome is its return value or OSError."""
        futs = [loop.run_in_executor(self.executor, fn, *args) for fn, *args in calls]
        await asyncio.wait(futs)
        out = []
        for f in futs:
            exc = f.exception()
            if exc is None:
                out.append(f.result())
            elif isinstance(exc, OSError):
                out.append(exc)
            else:
                raise exc
        return out

    def close(self) -> None:
        if self._own_executor:
            self.executor.shutdown(wait=True)


class _Abort:
    """Set when the caller of a batch was cancelled; the batch body then undoes its work."""

    __slots__ = ("set",)

    def __init__(self) -> None:
        self.set = False


async def _finish_even_if_cancelled(body, abort: _Abort):
    """Await ``body`` in its own task; if the caller is cancelled, let the body finish first.

    A batch holds slots and threads write into DRAM and NVMe memory: returning to a caller
    that then frees those slots while I/O is in flight would corrupt them. So cancellation
    sets ``abort`` (the body commits nothing further and frees what it allocated), waits for
    the body, and then propagates.
    """
    task = asyncio.ensure_future(body)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        abort.set = True
        while not task.done():
            try:
                await asyncio.shield(task)
            except (asyncio.CancelledError, Exception):
                pass
        if not task.cancelled():
            task.exception()  # retrieved, so it is not logged as unhandled
        raise
