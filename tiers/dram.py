"""DRAM tier: a slot arena in POSIX shared memory that same-host clients map directly.

The arena is one file in ``/dev/shm``. The node creates it and prefaults it on a background
thread (so puts do not pay for page faults, and the node is ready at once). A client on the same host maps the same file by name
(:func:`map_shared_arena`) and copies blocks in and out itself: the node never touches
the bytes of a same-host put or get, and no intermediate buffer exists.

When CUDA is present the mapping can be registered as pinned memory (``pin()``), so
copies between GPU and this tier are DMA.

Invariant: the node that created a segment is the only one that unlinks it (``close``).
Clients only unmap.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import threading

import numpy as np

from kvpool.tiers.base import Arena, Slot, TierCaps

__all__ = ["DramArena", "SharedSegment", "map_shared_arena", "SHM_DIR"]

SHM_DIR = "/dev/shm"


#: madvise(2) advice that faults pages in writable without changing their contents (Linux 5.14+).
_MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _Prefaulter:
    """Faults a segment's pages in on a background thread, in chunks, while the node serves.

    Why: without it, the first write to each page of the arena takes a page fault inside a
    client's copy; with MAP_POPULATE at start, a 4 GiB tier delays readiness by seconds.
    Faulting in must never change a byte a client may already have written, so it uses
    MADV_POPULATE_WRITE, called through ctypes so the GIL is released while the kernel works
    (``mmap.madvise`` holds it, which would stall the node's event loop). On kernels without
    it, it reads one byte per page instead (a read fault on shared memory allocates the page
    too), in small chunks. Stopping waits for the chunk in progress.
    """

    CHUNK = 64 << 20

    def __init__(self, segment: SharedSegment) -> None:
        self._segment = segment
        self._stop = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvpool-prefault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        array, size = self._segment.array, self._segment.size
        base = array.ctypes.data
        page = mmap.PAGESIZE
        use_madvise = True
        try:
            for start in range(0, size, self.CHUNK):
                if self._stop.is_set():
                    return
                length = min(self.CHUNK, size - start)
                if use_madvise and _libc.madvise(base + start, length, _MADV_POPULATE_WRITE) == 0:
                    continue
                use_madvise = False  # EINVAL: an older kernel
                for sub in range(start, start + length, 1 << 20):
                    int(array[sub:min(sub + (1 << 20), start + length):page].sum())
        finally:
            del array
            self.done.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class SharedSegment:
    """A mapped shm file as a flat uint8 numpy array (``.array``).

    ``populate`` faults its pages in on a background thread (:class:`_Prefaulter`), so neither
    the node that creates a segment nor a client that maps it waits seconds for a large tier.
    """

    def __init__(self, name: str, size: int, *, create: bool, populate: bool = True) -> None:
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self.size = size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"shared segment {name} is smaller than {size} bytes")
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        self._prefaulter = _Prefaulter(self) if populate else None

    def close(self) -> None:
        if self._prefaulter is not None:
            self._prefaulter.stop()
        self.array = None  # drop the export before the mmap closes
        try:
            self._mmap.close()
        except BufferError:
            # A caller still holds a view; the mapping goes when they drop it.
            pass

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def map_shared_arena(name: str, size: int) -> SharedSegment:
    """Map an existing node's DRAM arena (client side)."""
    return SharedSegment(name, size, create=False)


def _check_shm_space(size: int) -> None:
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise MemoryError(
            f"DRAM tier of {size} bytes does not fit in {SHM_DIR} ({free} bytes free); "
            f"lower --dram, or enlarge {SHM_DIR} (in a container: --shm-size / an emptyDir "
            f"with medium: Memory)"
        )


class DramArena(Arena):
    """Slots in a POSIX shared-memory segment owned by this node."""

    name = "dram"
    caps = TierCaps.HOST_SHARED | TierCaps.ADDRESSABLE

    def __init__(self, capacity: int, *, chunk_bytes: int = 64 << 20, prefault: bool = True,
                 segment_name: str | None = None) -> None:
        super().__init__(capacity, chunk_bytes)
        _check_shm_space(self.capacity)
        name = segment_name or f"kvpool-{os.getpid()}-{secrets.token_hex(4)}"
        # Prefaulting 4 GiB takes seconds; the node serves meanwhile (see _Prefaulter).
        self.segment = SharedSegment(name, self.capacity, create=True, populate=prefault)
        self.caps = type(self).caps  # an instance copy: pin() adds PINNED
        self._pinned = None

    @property
    def array(self) -> np.ndarray:
        return self.segment.array

    def view(self, slot: Slot) -> memoryview:
        return memoryview(self.segment.array[slot.offset : slot.offset + slot.size])

    def write(self, slot: Slot, data) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        if src.size != slot.size:
            raise ValueError(f"write of {src.size} bytes into a slot of {slot.size}")
        np.copyto(self.segment.array[slot.offset : slot.offset + slot.size], src)

    def read_into(self, slot: Slot, out) -> None:
        dst = np.frombuffer(out, dtype=np.uint8)
        np.copyto(dst, self.segment.array[slot.offset : slot.offset + slot.size])

    def describe(self) -> dict[str, str]:
        return {"shm_name": self.segment.name, "shm_size": str(self.capacity)}

    def pin(self) -> bool:
        """Register the segment as pinned host memory when CUDA is present. True if pinned."""
        from kvpool.tiers.pinning import register_pinned

        handle = register_pinned(self.segment.array)
        if handle is None:
            return False
        self._pinned = handle
        self.caps = self.caps | TierCaps.PINNED
        return True

    def close(self) -> None:
        if self._pinned is not None:
            from kvpool.tiers.pinning import unregister_pinned

            unregister_pinned(self._pinned)
            self._pinned = None
        self.segment.close()
        self.segment.unlink()
