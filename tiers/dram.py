"""DRAM tier: a slot arena in POSIX shared memory that same-host clients map directly.

The arena is one file in ``/dev/shm``. The node creates it and prefaults it (so the first
put does not pay for page faults). A client on the same host maps the same file by name
(:func:`map_shared_arena`) and copies blocks in and out itself: the node never touches
the bytes of a same-host put or get, and no intermediate buffer exists.

When CUDA is present the mapping can be registered as pinned memory (``pin()``), so
copies between GPU and this tier are DMA.

Invariant: the node that created a segment is the only one that unlinks it (``close``).
Clients only unmap.
"""

from __future__ import annotations

import mmap
import os
import secrets

import numpy as np

from kvpool.tiers.base import Arena, Slot, TierCaps

__all__ = ["DramArena", "SharedSegment", "map_shared_arena", "SHM_DIR"]

SHM_DIR = "/dev/shm"


class SharedSegment:
    """A mapped shm file as a flat uint8 numpy array (``.array``)."""

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
            mflags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            self._mmap = mmap.mmap(fd, size, flags=mflags)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    def close(self) -> None:
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
