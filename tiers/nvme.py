"""NVMe tier: fixed-size slots in one preallocated file, with slot-aligned direct I/O.

The arena is ``<data_dir>/nvme/slots.bin``, preallocated to the tier's capacity when it is
created (so a full disk shows up at start, not in the middle of a demotion) and kept as it
is when the node restarts: the bytes of the blocks that the catalog lists are still there.
The slab geometry (chunk size) is recorded beside it in ``geometry.json``; a restart uses
the recorded chunk size, because a slot's offset only means something on the grid it was
cut from.

Direct I/O. The file is opened twice: once with ``O_DIRECT`` (if the filesystem allows it;
the arena probes it with an aligned read at start) and once buffered. An operation goes
through the direct descriptor when its file offset, its length and the address and length of
every buffer are multiples of :data:`DIRECT_ALIGN` (4096, which covers 512-byte and 4 KiB
logical blocks), and through the buffered one otherwise. There is no bounce buffer: a block
whose size is not a multiple of 4096 is simply written and read buffered, so block sizes
(and the chunk size) should be multiples of 4096 to get direct I/O. DRAM slots of such
sizes are aligned too, because the DRAM arena is an mmap (page aligned) cut on the same grid.
When the filesystem refuses ``O_DIRECT`` altogether (ramfs, some FUSE and network
filesystems) the arena logs one line on ``kvpool.tiers.nvme`` and runs buffered.

Bytes move straight between arena memory and the file: ``os.pwritev``/``os.preadv`` take
memoryviews of the DRAM slots, and :meth:`NvmeArena.write_vectored` writes several DRAM slots
into one contiguous run of NVMe slots with a single system call.

Every method here blocks (``TierCaps.BLOCKING_IO``): callers run them off the event loop.
Reads and writes are positional and may run concurrently from several threads; allocation
and free (the slab bookkeeping) are not thread safe and belong to one thread.

Invariants:

* A write is durable only after :meth:`NvmeArena.sync` returns (one ``fdatasync`` covers
  direct and buffered writes alike: it is per file, not per descriptor).
* The slot file is never shrunk or truncated by the arena; a restart with a smaller
  capacity leaves the tail unused (the catalog drops entries beyond the new capacity).
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os

import numpy as np

from kvpool.tiers.base import Arena, Slot, TierCaps

__all__ = ["NvmeArena", "DIRECT_ALIGN", "SLOT_FILE", "probe_direct_io"]

log = logging.getLogger(__name__)

#: Alignment of file offsets, lengths and buffer addresses for O_DIRECT.
DIRECT_ALIGN = 4096
#: The slot file, relative to the data dir.
SLOT_FILE = os.path.join("nvme", "slots.bin")
_GEOMETRY_FILE = os.path.join("nvme", "geometry.json")
#: Linux caps one preadv/pwritev at IOV_MAX (1024) buffers.
try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):
    _IOV_MAX = 1024


def _address(buf) -> int:
    """The address of a buffer's first byte (works for read-only buffers too)."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def probe_direct_io(fd_direct: int) -> str | None:
    """None if an aligned O_DIRECT read works on ``fd_direct``; otherwise the reason."""
    probe = mmap.mmap(-1, DIRECT_ALIGN)  # anonymous mmap: page aligned
    try:
        os.preadv(fd_direct, [probe], 0)
        return None
    except OSError as e:
        return f"an aligned O_DIRECT read failed: {e.strerror} (errno {e.errno})"
    finally:
        probe.close()


class NvmeArena(Arena):
    """Slots in a preallocated file under ``data_dir``; survives restarts (with a catalog).

    ``direct``: None probes O_DIRECT and falls back to buffered I/O (one log line) when the
    filesystem refuses it; False forces buffered I/O; True requires O_DIRECT and raises if
    the filesystem refuses it.

    ``preallocate``: reserve the whole capacity on disk at start (``posix_fallocate``). A disk
    that cannot hold it fails here with ENOSPC. False leaves the file sparse, so a full disk
    surfaces later as ENOSPC from :meth:`write` (callers must handle that; the mover does).
    """

    name = "nvme"
    caps = TierCaps.PERSISTENT | TierCaps.BLOCKING_IO

    def __init__(self, data_dir: str, capacity: int, *, chunk_bytes: int = 64 << 20,
                 direct: bool | None = None, preallocate: bool = True) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.path = os.path.join(self.data_dir, SLOT_FILE)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        chunk_bytes = self._load_geometry(chunk_bytes)
        # Every chunk starts on a DIRECT_ALIGN boundary, so slots whose size is a multiple
        # of it are aligned too (the slab cuts a chunk at multiples of the block size).
        if chunk_bytes % DIRECT_ALIGN:
            raise ValueError(f"NVMe chunk size {chunk_bytes} is not a multiple of {DIRECT_ALIGN}")
        capacity -= capacity % DIRECT_ALIGN
        if capacity <= 0:
            raise ValueError(f"NVMe capacity must be at least {DIRECT_ALIGN} bytes")
        super().__init__(capacity, chunk_bytes)
        self._fd = -1
        self._fd_direct = -1
        self.direct_reason: str | None = None  # why O_DIRECT is off, or None when on
        created = not os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            self._size_file(created, preallocate)
            self._save_geometry()
            self._open_direct(direct)
        except BaseException:
            self.close()
            if created:
                _unlink_quietly(self.path)
            raise

    # -- setup -----------------------------------------------------------------------------

    def _load_geometry(self, chunk_bytes: int) -> int:
        path = os.path.join(self.data_dir, _GEOMETRY_FILE)
        if not os.path.exists(os.path.join(self.data_dir, SLOT_FILE)):
            return chunk_bytes
        try:
            with open(path) as f:
                recorded = int(json.load(f)["chunk_bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return chunk_bytes
        if recorded != chunk_bytes:
            log.warning(
                "NVMe slot file %s was cut into %d-byte chunks; keeping that (asked for %d)",
                os.path.join(self.data_dir, SLOT_FILE), recorded, chunk_bytes,
            )
        return recorded

    def _save_geometry(self) -> None:
        path = os.path.join(self.data_dir, _GEOMETRY_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"chunk_bytes": self.slots.chunk_bytes, "align": DIRECT_ALIGN}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _size_file(self, created: bool, preallocate: bool) -> None:
        size = os.fstat(self._fd).st_size
        if preallocate:
            try:
                os.posix_fallocate(self._fd, 0, self.capacity)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                st = os.statvfs(self.data_dir)
                free = st.f_bavail * st.f_frsize
                raise OSError(
                    errno.ENOSPC,
                    f"NVMe tier of {self.capacity} bytes does not fit in {self.data_dir} "
                    f"({free} bytes free): lower --nvme or free disk space",
                ) from None
        elif size < self.capacity:
            os.ftruncate(self._fd, self.capacity)  # sparse: blocks are allocated on write
        if not created and size > self.capacity:
            log.info("NVMe slot file %s is %d bytes; using the first %d", self.path, size,
                     self.capacity)

    def _open_direct(self, direct: bool | None) -> None:
        if direct is False:
            self.direct_reason = "O_DIRECT disabled by configuration"
            log.info("NVMe tier %s: buffered I/O (%s)", self.path, self.direct_reason)
            return
        flag = getattr(os, "O_DIRECT", 0)
        reason = None
        if not flag:
            reason = "this platform has no O_DIRECT"
        else:
            try:
                self._fd_direct = os.open(self.path, os.O_RDWR | flag | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                reason = f"the filesystem refuses O_DIRECT: {e.strerror} (errno {e.errno})"
            else:
                reason = probe_direct_io(self._fd_direct)
                if reason is not None:
                    os.close(self._fd_direct)
                    self._fd_direct = -1
        if reason is not None:
            if direct:
                raise OSError(errno.EINVAL, f"NVMe tier {self.path}: {reason}")
            self.direct_reason = reason
            log.warning("NVMe tier %s: falling back to buffered I/O because %s; reads may be "
                        "served from the page cache", self.path, reason)

    # -- properties ------------------------------------------------------------------------

    @property
    def direct(self) -> bool:
        """True when aligned operations bypass the page cache (O_DIRECT is on)."""
        return self._fd_direct >= 0

    def is_direct(self, offset: int, buffers) -> bool:
        """Whether an operation at ``offset`` over ``buffers`` would go through O_DIRECT."""
        if self._fd_direct < 0 or offset % DIRECT_ALIGN:
            return False
        for b in buffers:
            if len(b) % DIRECT_ALIGN or _address(b) % DIRECT_ALIGN:
                return False
        return True

    # -- I/O -------------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.capacity:
            raise ValueError(f"I/O of {length} bytes at {offset} is outside the NVMe arena "
                             f"of {self.capacity} bytes")

    def write_vectored(self, offset: int, buffers) -> None:
        """Write ``buffers`` back to back into the file from ``offset`` (one contiguous run).

        Each buffer is typically one slot's worth of DRAM arena memory; no copy is made.
        Direct I/O when everything is aligned (see the module docstring), buffered otherwise.
        Raises ``OSError`` (ENOSPC on a full disk for a sparse file). Not durable until
        :meth:`sync`.
        """
        bufs = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(b) for b in bufs)
        self._check_range(offset, total)
        fd = self._fd_direct if self.is_direct(offset, bufs) else self._fd
        self._transfer(os.pwritev, fd, bufs, offset)

    def read_vectored(self, offset: int, buffers) -> None:
        """Fill writable ``buffers`` back to back from the file starting at ``offset``."""
        bufs = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(b) for b in bufs)
        self._check_range(offset, total)
        fd = self._fd_direct if self.is_direct(offset, bufs) else self._fd
        self._transfer(os.preadv, fd, bufs, offset)

    def write(self, slot: Slot, data) -> None:
        """Write one block (a buffer of exactly ``slot.size`` bytes) into ``slot``."""
        mv = memoryview(data).cast("B")
        if len(mv) != slot.size:
            raise ValueError(f"write of {len(mv)} bytes into a slot of {slot.size}")
        self.write_vectored(slot.offset, [mv])

    def read_into(self, slot: Slot, out) -> None:
        """Read ``slot`` into ``out``, a writable buffer of exactly ``slot.size`` bytes."""
        mv = memoryview(out).cast("B")
        if len(mv) != slot.size:
            raise ValueError(f"read of a {slot.size}-byte slot into {len(mv)} bytes")
        self.read_vectored(slot.offset, [mv])

    def sync(self) -> None:
        """Make every completed write durable (``fdatasync`` of the slot file)."""
        os.fdatasync(self._fd)

    def _transfer(self, op, fd: int, bufs: list[memoryview], offset: int) -> None:
        """Run ``op`` (preadv or pwritev) until every buffer is done, IOV_MAX at a time.

        A short transfer leaves the rest unaligned, so what follows one goes buffered.
        """
        while bufs:
            batch = bufs[:_IOV_MAX]
            n = op(fd, batch, offset)
            if n <= 0:
                what = "wrote nothing" if op is os.pwritev else "hit the end of the slot file"
                raise OSError(errno.EIO, f"{op.__name__} {what} at offset {offset} of {self.path}")
            if n < sum(len(b) for b in batch):
                fd = self._fd
            offset += n
            bufs = _advance(bufs, n)

    def describe(self) -> dict[str, str]:
        return {"path": self.path, "direct": "1" if self.direct else "0",
                "chunk_bytes": str(self.slots.chunk_bytes)}

    def close(self) -> None:
        """Close the slot file. It stays on disk: it is the tier's persistent state."""
        for attr in ("_fd_direct", "_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after a short transfer of ``n`` bytes."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
