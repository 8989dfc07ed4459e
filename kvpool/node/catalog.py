"""The NVMe catalog: which block lives in which NVMe slot, kept in LMDB so it survives restarts.

One LMDB environment at ``<data_dir>/catalog/`` maps a 16-byte block key to its slot
(offset, size), its xxh3-64 checksum and its namespace id. The node reads it at start,
claims the listed slots in the NVMe arena and reports the blocks to the master.

Invariants (the mover keeps them; anything else that writes here must too):

* **An entry is written only after its slot's bytes are durable.** The writer writes the
  slots, ``fdatasync``s the slot file, and only then calls :meth:`NvmeCatalog.put_many`
  (one LMDB transaction per batch, itself synced on commit). A crash at any point leaves
  either no entry or an entry whose bytes are on disk.
* **An entry is deleted before its slot is freed** (:meth:`NvmeCatalog.delete_many` returns
  only once the deletion is durable), so a slot that is reused can never be named by a
  stale entry.
* Entries never overlap: the arena hands out disjoint slots. :meth:`load_verified` checks it
  anyway, along with sizes and bounds, and drops what fails.

The checksum is not verified here (that needs the bytes); the mover verifies it on every read.
All methods block (LMDB commits fsync) and are safe to call from several threads.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import lmdb

from kvpool.tiers.base import Slot

__all__ = ["CatalogEntry", "NvmeCatalog", "CATALOG_DIR", "KEY_BYTES"]

log = logging.getLogger(__name__)

#: The catalog's LMDB directory, relative to the data dir.
CATALOG_DIR = "catalog"
KEY_BYTES = 16
#: A key as the master scopes it: 16 bytes, then the tenant's name (kvpool.master.index).
MAX_KEY_BYTES = KEY_BYTES + 64

# value = version, offset, size, checksum, then the namespace id in UTF-8.
_VALUE = struct.Struct("<BQQQ")
_VERSION = 1
_MIN_MAP = 256 << 10
#: A failed commit on a disk with less free space than this is reported as ENOSPC.
_FULL_DISK_BYTES = 4 << 20


@dataclass(frozen=True)
class CatalogEntry:
    """One block on NVMe: its key, its slot, its xxh3-64 checksum and its namespace id."""

    key: bytes
    offset: int
    size: int
    checksum: int
    namespace: str = ""

    @property
    def slot(self) -> Slot:
        return Slot(self.offset, self.size)

    def encode(self) -> bytes:
        return _VALUE.pack(_VERSION, self.offset, self.size, self.checksum) + \
            self.namespace.encode()

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> CatalogEntry:
        """Parse a stored value; raises ValueError for one this version cannot read."""
        if len(value) < _VALUE.size:
            raise ValueError(f"value of {len(value)} bytes is too short")
        version, offset, size, checksum = _VALUE.unpack_from(value)
        if version != _VERSION:
            raise ValueError(f"unknown catalog value version {version}")
        return cls(bytes(key), offset, size, checksum, bytes(value[_VALUE.size:]).decode())


class NvmeCatalog:
    """Block key -> :class:`CatalogEntry`, durable in LMDB under ``data_dir``.

    ``map_size`` is where the LMDB map starts; it doubles whenever a write fills it, so the
    catalog grows with the tier (an entry takes about 100 to 200 bytes with overhead).
    """

    def __init__(self, data_dir: str, *, map_size: int = 64 << 20) -> None:
        self.path = os.path.join(os.path.abspath(data_dir), CATALOG_DIR)
        os.makedirs(self.path, exist_ok=True)
        # sync/metasync on: a commit returns only once it is on disk. One writer process
        # owns a data dir; lock=True still guards against a second node opening it.
        self._env = lmdb.open(self.path, map_size=max(map_size, _MIN_MAP), subdir=True,
                              sync=True, metasync=True, max_dbs=0, readahead=False)
        # set_mapsize must not race with open transactions in this process: one lock.
        self._lock = threading.RLock()

    # -- writes ----------------------------------------------------------------------------

    def put_many(self, entries: Iterable[CatalogEntry]) -> None:
        """Add or replace entries in one durable transaction.

        Call only once the entries' bytes are durable (after the arena's ``sync``). Raises
        ``OSError`` (ENOSPC on a full disk) if the commit fails; then nothing was written.
        """
        items = []
        for e in entries:
            if not KEY_BYTES <= len(e.key) <= MAX_KEY_BYTES:
                raise ValueError(f"block keys are {KEY_BYTES} bytes (and a tenant), got {len(e.key)}")
            items.append((e.key, e.encode()))
        if items:
            self._write(lambda txn: [txn.put(k, v) for k, v in items])

    def delete_many(self, keys: Iterable[bytes]) -> int:
        """Remove entries in one durable transaction; returns how many existed.

        Free the entries' slots only after this returns.
        """
        keys = list(keys)
        if not keys:
            return 0
        return sum(self._write(lambda txn: [txn.delete(k) for k in keys]))

    def delete_matching(self, items: Iterable[tuple[bytes, Slot]]) -> list[bool]:
        """Remove each entry that still names the given slot, in one durable transaction.

        Returns, per item, whether it was removed. An entry that names another slot (the
        block was written again elsewhere) or that is gone already is left alone, so a
        caller holding a stale slot can never remove the current copy.
        """
        items = [(k, Slot(*s)) for k, s in items]
        if not items:
            return []

        def txn_fn(txn):
            done = []
            for k, slot in items:
                value = txn.get(k)
                ok = False
                if value is not None:
                    try:
                        ok = CatalogEntry.decode(k, value).slot == slot
                    except ValueError:
                        ok = False
                done.append(ok and txn.delete(k))
            return done

        return self._write(txn_fn)

    def _write(self, fn):
        with self._lock:
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapFullError:
                    # The failed transaction was aborted: nothing was written. Grow and retry.
                    size = self._env.info()["map_size"] * 2
                    log.info("NVMe catalog %s: growing the LMDB map to %d bytes", self.path, size)
                    self._env.set_mapsize(size)
                except lmdb.Error as exc:
                    # LMDB aborts a transaction whose commit fails, leaving the previous state
                    # intact. It reports a full disk as a bare EIO, so look at the disk.
                    raise OSError(self._write_errno(), f"NVMe catalog {self.path}: {exc}") from exc

    def _write_errno(self) -> int:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return errno.EIO
        return errno.ENOSPC if st.f_bavail * st.f_frsize < _FULL_DISK_BYTES else errno.EIO

    # -- reads -----------------------------------------------------------------------------

    def get(self, key: bytes) -> CatalogEntry | None:
        with self._lock, self._env.begin() as txn:
            value = txn.get(key)
        if value is None:
            return None
        return CatalogEntry.decode(key, value)

    def get_many(self, keys: Iterable[bytes]) -> list[CatalogEntry | None]:
        with self._lock, self._env.begin() as txn:
            raw = [(k, txn.get(k)) for k in keys]
        return [None if v is None else CatalogEntry.decode(k, v) for k, v in raw]

    def __contains__(self, key: bytes) -> bool:
        with self._lock, self._env.begin() as txn:
            return txn.get(key) is not None

    def __len__(self) -> int:
        with self._lock:
            return self._env.stat()["entries"]

    def __iter__(self) -> Iterator[CatalogEntry]:
        """Every readable entry, in key order (a snapshot taken when iteration starts)."""
        for key, value in self._raw_items():
            try:
                yield CatalogEntry.decode(key, value)
            except ValueError:
                continue

    def _raw_items(self) -> list[tuple[bytes, bytes]]:
        with self._lock, self._env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]

    # -- restart ---------------------------------------------------------------------------

    def load_verified(self, arena_capacity: int, *,
                      chunk_bytes: int | None = None) -> list[CatalogEntry]:
        """The entries that pass cheap checks, sorted by offset; the rest are deleted and logged.

        Checks: the key is 16 bytes (and a tenant) and the value decodes; ``size > 0``; the slot lies inside
        ``[0, arena_capacity)``; with ``chunk_bytes``, the slot sits on the slab grid (inside
        one chunk, at a multiple of its size from the chunk's start); no two slots overlap.
        Overlapping entries are all dropped, since nothing says which one is right. Bytes are
        not read: the checksum is verified when a block is promoted.
        """
        good: list[CatalogEntry] = []
        bad: list[tuple[bytes, str]] = []
        for key, value in self._raw_items():
            try:
                if not KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
                    raise ValueError(f"key of {len(key)} bytes")
                e = CatalogEntry.decode(key, value)
            except (ValueError, UnicodeDecodeError) as exc:
                bad.append((key, f"unreadable entry ({exc})"))
                continue
            reason = _slot_problem(e, arena_capacity, chunk_bytes)
            if reason:
                bad.append((key, reason))
            else:
                good.append(e)
        good.sort(key=lambda e: e.offset)
        kept: list[CatalogEntry] = []
        overlapping: set[int] = set()
        end = -1  # end of the furthest-reaching slot so far, and who owns it
        owner = -1
        for i, e in enumerate(good):
            if e.offset < end:
                overlapping.update((i, owner))
            if e.offset + e.size > end:
                end, owner = e.offset + e.size, i
        for i, e in enumerate(good):
            if i in overlapping:
                bad.append((e.key, f"slot {e.slot} overlaps another entry's slot"))
            else:
                kept.append(e)
        if bad:
            for key, reason in bad:
                log.warning("NVMe catalog: dropping block %s: %s", key.hex(), reason)
            self.delete_many(k for k, _ in bad)
        return kept

    def sync(self) -> None:
        self._env.sync(True)

    def close(self) -> None:
        with self._lock:
            self._env.close()

    def __enter__(self) -> NvmeCatalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _slot_problem(e: CatalogEntry, capacity: int, chunk_bytes: int | None) -> str | None:
    if e.size <= 0:
        return f"size {e.size}"
    if e.offset < 0 or e.offset + e.size > capacity:
        return f"slot {e.slot} is outside the arena of {capacity} bytes"
    if chunk_bytes:
        if e.size > chunk_bytes:
            return f"size {e.size} exceeds the chunk size {chunk_bytes}"
        within = e.offset % chunk_bytes
        if within % e.size or within + e.size > chunk_bytes:
            return f"slot {e.slot} is off the slab grid of {chunk_bytes}-byte chunks"
    return None
