"""The tier interface: an arena of fixed-size slots, one slab per block size (docs/design.md §4).

Every tier (HBM, DRAM, NVMe) is an :class:`Arena`. The node asks an arena for a slot of
exactly a block's size, moves bytes in or out of it, and frees it. Allocation and free
are O(1) and never fragment, because the arena is cut into equal *chunks* and each chunk,
once bound to a block size, is cut into equal slots of that size. A chunk whose slots are
all free again goes back to the pool of unbound chunks, so a block size that falls out
of use does not keep its memory.

What a tier can do is declared in :class:`TierCaps`; callers test flags, never names.

Invariants:

* A slot is owned by exactly one caller between ``allocate`` and ``free``.
* ``free`` of a slot that is not allocated raises; a double free is a bug, never ignored.
* ``used_bytes`` is the sum of the sizes of allocated slots.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["TierCaps", "Slot", "SlabAllocator", "Arena", "TierUsage"]


class TierCaps(enum.Flag):
    """Capabilities a tier declares. Code branches on these, never on a tier's name."""

    NONE = 0
    #: Other processes on the same host can map the arena's bytes (POSIX shm).
    HOST_SHARED = enum.auto()
    #: The bytes are host memory registered for DMA with the GPU (cudaHostRegister).
    PINNED = enum.auto()
    #: The bytes live in GPU memory.
    DEVICE = enum.auto()
    #: Co-located processes can map the arena through CUDA IPC handles.
    CUDA_IPC = enum.auto()
    #: The bytes survive a restart of the node (with a catalog).
    PERSISTENT = enum.auto()
    #: I/O blocks (disk): callers must run it off the event loop.
    BLOCKING_IO = enum.auto()
    #: The tier exposes a zero-copy memoryview of a slot (``Arena.view``).
    ADDRESSABLE = enum.auto()


class Slot(NamedTuple):
    """A slot in one arena: its byte offset and its size (the block size it was cut for)."""

    offset: int
    size: int


@dataclass(frozen=True)
class TierUsage:
    name: str
    capacity_bytes: int
    used_bytes: int
    used_slots: int

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes


class _SizeClass:
    __slots__ = ("size", "per_chunk", "free", "live_in_chunk")

    def __init__(self, size: int, per_chunk: int) -> None:
        self.size = size
        self.per_chunk = per_chunk
        self.free: list[int] = []  # free slot offsets (LIFO: reuse warm memory first)
        self.live_in_chunk: dict[int, int] = {}  # chunk index -> allocated slots in it


class SlabAllocator:
    """Bookkeeping for fixed-size slots over ``capacity`` bytes; owns no memory itself.

    The byte range is divided into ``capacity // chunk_bytes`` chunks. A block size gets
    chunks on demand; a chunk that empties returns to the unbound pool.
    """

    def __init__(self, capacity: int, chunk_bytes: int = 64 << 20) -> None:
        if capacity <= 0:
            raise ValueError("arena capacity must be positive")
        self.chunk_bytes = min(chunk_bytes, capacity)
        self.num_chunks = capacity // self.chunk_bytes
        self.capacity = self.num_chunks * self.chunk_bytes
        self._unbound: list[int] = list(range(self.num_chunks - 1, -1, -1))
        self._classes: dict[int, _SizeClass] = {}
        self._allocated: dict[int, int] = {}  # offset -> size
        self.used_bytes = 0

    @property
    def max_block_bytes(self) -> int:
        return self.chunk_bytes

    @property
    def used_slots(self) -> int:
        return len(self._allocated)

    def free_slots_for(self, size: int) -> int:
        """How many blocks of ``size`` could be allocated right now."""
        if size > self.chunk_bytes:
            return 0
        cls = self._classes.get(size)
        ready = len(cls.free) if cls else 0
        return ready + len(self._unbound) * (self.chunk_bytes // size)

    def allocate(self, size: int) -> Slot | None:
        """A slot of exactly ``size`` bytes, or None when no chunk can hold one."""
        if size <= 0 or size > self.chunk_bytes:
            raise ValueError(
                f"a block of {size} bytes cannot fit a slab chunk of {self.chunk_bytes} bytes"
            )
        cls = self._classes.get(size)
        if cls is None:
            cls = self._classes[size] = _SizeClass(size, self.chunk_bytes // size)
        if not cls.free:
            if not self._unbound:
                return None
            chunk = self._unbound.pop()
            base = chunk * self.chunk_bytes
            # Push in reverse so the lowest offset is handed out first.
            cls.free.extend(base + i * size for i in range(cls.per_chunk - 1, -1, -1))
            cls.live_in_chunk[chunk] = 0
        offset = cls.free.pop()
        chunk = offset // self.chunk_bytes
        cls.live_in_chunk[chunk] += 1
        self._allocated[offset] = size
        self.used_bytes += size
        return Slot(offset, size)

    def free(self, slot: Slot) -> None:
        size = self._allocated.pop(slot.offset, None)
        if size is None or size != slot.size:
            raise RuntimeError(f"free of a slot that is not allocated: {slot}")
        self.used_bytes -= size
        cls = self._classes[size]
        chunk = slot.offset // self.chunk_bytes
        cls.live_in_chunk[chunk] -= 1
        cls.free.append(slot.offset)
        if cls.live_in_chunk[chunk] == 0 and len(cls.free) > cls.per_chunk:
            # Keep one empty chunk per class warm; return the others to the pool.
            self._release_chunk(cls, chunk)

    def _release_chunk(self, cls: _SizeClass, chunk: int) -> None:
        lo = chunk * self.chunk_bytes
        hi = lo + self.chunk_bytes
        cls.free = [o for o in cls.free if not lo <= o < hi]
        del cls.live_in_chunk[chunk]
        self._unbound.append(chunk)

    def claim(self, slot: Slot) -> None:
        """Mark ``slot`` allocated at its exact offset (restart: a catalog says it holds a block).

        The slot must sit on the slab grid: inside one chunk, at a multiple of its size from
        the chunk's start, with the chunk either unbound or bound to the same block size.
        Raises ``ValueError`` for a slot that is out of bounds or off the grid, and
        ``RuntimeError`` for one that overlaps an allocated slot or a chunk bound to another
        size. Cost: O(log chunks) to bind a chunk on a freshly built allocator (the restart
        case), O(slots per chunk) otherwise; claiming a chunk's slots in order is cheap.
        """
        import bisect

        offset, size = slot.offset, slot.size
        if size <= 0 or size > self.chunk_bytes:
            raise ValueError(f"cannot claim {slot}: size must be in 1..{self.chunk_bytes}")
        if offset < 0 or offset + size > self.capacity:
            raise ValueError(f"cannot claim {slot}: outside the arena of {self.capacity} bytes")
        chunk, within = divmod(offset, self.chunk_bytes)
        per_chunk = self.chunk_bytes // size
        if within % size or within // size >= per_chunk:
            raise ValueError(
                f"cannot claim {slot}: not on the slot grid of {size}-byte blocks "
                f"in {self.chunk_bytes}-byte chunks"
            )
        if offset in self._allocated:
            raise RuntimeError(f"cannot claim {slot}: offset already allocated")
        cls = self._classes.get(size)
        if cls is None or chunk not in cls.live_in_chunk:
            for other in self._classes.values():
                if chunk in other.live_in_chunk:
                    raise RuntimeError(
                        f"cannot claim {slot}: its chunk holds {other.size}-byte blocks"
                    )
            # Bind the chunk exactly as allocate() does. A fresh allocator keeps _unbound in
            # descending order, so bisect finds the chunk; otherwise fall back to a scan.
            unbound = self._unbound
            i = bisect.bisect_left(unbound, -chunk, key=lambda c: -c)
            if i < len(unbound) and unbound[i] == chunk:
                del unbound[i]
            else:
                try:
                    unbound.remove(chunk)
                except ValueError:
                    raise RuntimeError(f"cannot claim {slot}: chunk {chunk} is lost") from None
            if cls is None:
                cls = self._classes[size] = _SizeClass(size, per_chunk)
            base = chunk * self.chunk_bytes
            cls.free.extend(base + i * size for i in range(per_chunk - 1, -1, -1))
            cls.live_in_chunk[chunk] = 0
        free = cls.free
        # The chunk's free offsets were most likely pushed last: look at the tail first.
        try:
            i = free.index(offset, max(0, len(free) - 2 * per_chunk))
        except ValueError:
            try:
                i = free.index(offset)
            except ValueError:
                raise RuntimeError(f"cannot claim {slot}: not free in its chunk") from None
        free[i] = free[-1]  # swap-remove: the free list's order is only a preference
        free.pop()
        cls.live_in_chunk[chunk] += 1
        self._allocated[offset] = size
        self.used_bytes += size

    def is_allocated(self, slot: Slot) -> bool:
        return self._allocated.get(slot.offset) == slot.size


class Arena(ABC):
    """One tier's storage: slots allocated from a :class:`SlabAllocator`.

    Subclasses provide the memory (shm, device, files) and byte movement. ``caps`` says
    which optional methods work; calling one a tier lacks raises ``NotImplementedError``.
    """

    #: Short tier name for stats and the wire ("hbm", "dram", "nvme").
    name: str = ""
    caps: TierCaps = TierCaps.NONE

    def __init__(self, capacity: int, chunk_bytes: int = 64 << 20) -> None:
        self.slots = SlabAllocator(capacity, chunk_bytes)

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    @property
    def used_bytes(self) -> int:
        return self.slots.used_bytes

    def usage(self) -> TierUsage:
        return TierUsage(self.name, self.capacity, self.slots.used_bytes, self.slots.used_slots)

    def allocate(self, size: int) -> Slot | None:
        return self.slots.allocate(size)

    def free(self, slot: Slot) -> None:
        self.slots.free(slot)

    def view(self, slot: Slot) -> memoryview:
        """A zero-copy writable view of the slot's bytes (tiers with ADDRESSABLE)."""
        raise NotImplementedError(f"tier {self.name} is not addressable")

    @abstractmethod
    def write(self, slot: Slot, data) -> None:
        """Copy ``data`` (any buffer of ``slot.size`` bytes) into the slot."""

    @abstractmethod
    def read_into(self, slot: Slot, out) -> None:
        """Copy the slot's bytes into ``out`` (a writable buffer of ``slot.size`` bytes)."""

    def describe(self) -> dict[str, str]:
        """What a client needs to reach this arena directly (e.g. a shm name)."""
        return {}

    def close(self) -> None:
        """Release the arena's memory; for shared memory, unlink it."""
