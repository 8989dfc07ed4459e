"""Eviction policies: which committed, unpinned blocks leave a tier first.

Protocol between the master's index and a policy:

* ``insert(key, info)`` when a block is committed (becomes resident in the tier);
  ``insert_many(keys, infos)`` for a batch (one put's blocks, in chain order);
* ``access(key)`` on every hit (Lookup, Get) of a resident block; ``access_many(keys)`` for a
  batch (a lease's blocks, when it ends);
* ``remove(key)`` when a block leaves, whoever chose it (eviction, Remove, Flush);
  ``remove_many(keys)`` for a batch (the victims of one eviction, once they are dropped);
* ``select_victims(count, evictable)`` returns up to ``count`` resident keys, best victim
  first, for which ``evictable(key)`` is true. It does not remove them: the index evicts
  what it takes and tells the policy with one ``remove_many`` of them.

A policy only orders keys. It never frees memory and never sees leases or grants: the
``evictable`` predicate is how the index keeps leased and uncommitted blocks out of reach
(and the index checks every victim against it again). ``BlockInfo`` carries what the index
knows of a block's place in its prefix chain: its position, its parent's key and whether it
ended the chain its writer published.
The replay tool (``kvpool replay``) drives these same classes through the same calls,
so what it measures is what the master runs.
"""

from __future__ import annotations

import heapq
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from operator import attrgetter
from typing import Callable, ClassVar, NamedTuple

import numpy as np
import xxhash

__all__ = [
    "BlockInfo",
    "EvictionPolicy",
    "LRUPolicy",
    "PacedAdmissionPolicy",
    "HitDensityPolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "MRUPolicy",
    "POLICIES",
    "make_policy",
    "DEFAULT_POLICY",
]


class BlockInfo(NamedTuple):
    """What a policy may know about a block when it is inserted.

    Immutable, and a named tuple rather than a frozen dataclass because the index makes one
    per committed block: a frozen dataclass sets each field through ``object.__setattr__``
    (about 0.7 us a block, ~10 us a typical put), a named tuple in a third of that."""

    size: int
    #: Index of the block in its prefix chain (0 = first block of a prompt); -1 if unknown.
    position: int = -1
    namespace: str = ""
    #: Key of the block before it in its prefix chain, when the writer sent both in one batch
    #: (the index learns parents from ``PutStart`` batches); None for a root or if unknown.
    parent: bytes | None = None
    #: It was the last block of the chain its writer published (the chain's leaf).
    last: bool = False


class EvictionPolicy(ABC):
    name: ClassVar[str]

    @classmethod
    def prepare(cls, wait: bool = False) -> None:
        """Load what the policy needs once per process (compiled code): with ``wait`` now
        (the index does, when it is built, before the master answers), else in the
        background (a policy made without an index keeps its calls until it is loaded)."""

    @abstractmethod
    def insert(self, key: bytes, info: BlockInfo) -> None: ...

    def insert_many(self, keys, infos) -> None:
        """``insert`` of each (key, info) in order; the index commits a put as one batch, so
        policies may override it to do their work once per batch."""
        for key, info in zip(keys, infos):
            self.insert(key, info)

    @abstractmethod
    def access(self, key: bytes) -> None: ...

    def access_many(self, keys) -> None:
        """``access`` of each key in order; policies override it to batch the work (a
        128K-token read touches 8,192 blocks at once)."""
        for key in keys:
            self.access(key)

    @abstractmethod
    def remove(self, key: bytes) -> None: ...

    def remove_many(self, keys) -> None:
        """``remove`` of each key in order; the index tells an eviction's victims in one call."""
        for key in keys:
            self.remove(key)

    @abstractmethod
    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]: ...

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first. O(1) insert, access and remove."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, info: BlockInfo) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def access_many(self, keys) -> None:
        order = self._order
        move = order.move_to_end
        for key in keys:
            if key in order:
                move(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def remove_many(self, keys) -> None:
        pop = self._order.pop
        for key in keys:
            pop(key, None)

    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        out: list[bytes] = []
        for key in self._order:
            if len(out) >= count:
                break
            if evictable(key):
                out.append(key)
        return out

    def __len__(self) -> int:
        return len(self._order)


class PacedAdmissionPolicy(EvictionPolicy):
    """LRU with paced admission, a reference history and leaf demotion ("paced").

    Why not plain LRU: on prefix-cache traces (the FAST'25 conversation trace) a block is
    almost never reused within the first ~100 requests after a use (the user has not answered
    yet), and the typical reuse comes hundreds of requests later. An LRU smaller than that
    reuse distance keeps every block a little while and evicts almost all of them just before
    they would have been reused. It is better to keep *fewer* blocks for *longer*.

    Structure: two queues, both in eviction order (front leaves first).

    * ``main``: LRU of admitted blocks. Hits (``access``) always move a block to its MRU end.
    * ``probation``: FIFO of blocks that were not admitted; it is emptied before ``main``.

    Admission, when a block is inserted:

    * A key seen before (it is in the *history*: the last reference tick of recently referenced
      keys, resident or not) goes to ``main``: a block referenced twice is much more likely to
      be referenced again (on the trace: 24% after one use, 42% after two, 50%+ after three).
    * A first-seen block goes to ``main`` with probability ``eps`` and to ``probation``
      otherwise. The decision is taken once per run of consecutive positions (one request's
      publish) so that a chain is admitted or not as a whole: a chain with a hole is worth only
      its part before the hole. The draw is a deterministic credit counter, not a random number.
    * ``eps`` is paced by a feedback loop: when a block leaves ``main`` by eviction, its age
      (ticks since its last reference) is compared with the median reuse distance measured on
      the reference stream. If admitted blocks die younger than the typical reuse distance,
      the pool is too small to keep everything that long, so ``eps`` shrinks; if they live
      longer, it grows (up to 1: plain LRU with the refinements below). A big pool therefore
      admits everything and a small one admits a steady trickle that it can keep long enough.

    Position in the prefix chain (``BlockInfo.position``): the last block of a request is
    almost never reused (on the trace, 1.8% vs about 50% for the others: it is the partial
    block that the next turn rewrites). When a run of consecutive positions ends (the next
    call starts again at a position no deeper than the last one), its last block is moved to
    the front of ``probation``. With ``position == -1`` (unknown) this inference is simply off.

    Time is counted in policy calls (insert and access), so the policy needs no clock. All
    operations are O(1) amortized: dict/OrderedDict updates, and the history is pruned in one
    pass every ``horizon`` ticks, where the horizon bounds the history to the keys referenced
    within that many calls. Sizes are ignored: the policy only orders keys.
    """

    name = "paced"

    #: Feedback gain of the admission fraction, per block evicted from ``main``.
    GAIN: ClassVar[float] = 0.01
    #: Step of the streaming median of the log reuse distance.
    MEDIAN_STEP: ClassVar[float] = 0.02
    #: How long a key stays in the history: max(HISTORY_MIN, HISTORY_MULT x median reuse distance).
    HISTORY_MIN: ClassVar[int] = 1 << 16
    HISTORY_MULT: ClassVar[int] = 16
    #: Admission fraction of first-seen blocks before any feedback (1.0: start as LRU).
    INITIAL_ADMIT: ClassVar[float] = 1.0

    def __init__(self) -> None:
        # key -> tick of last reference; the dict a key is in is its queue.
        self._main: OrderedDict[bytes, int] = OrderedDict()
        self._prob: OrderedDict[bytes, int] = OrderedDict()
        self._where: dict[bytes, OrderedDict[bytes, int]] = {}
        self._pos: dict[bytes, int] = {}
        self._history: dict[bytes, int] = {}
        self._tick = 0
        self._pruned_at = 0
        # The streaming median of reuse distances moves by a factor of exp(±MEDIAN_STEP) per
        # observation (a median in log space), kept in linear space so the hot path needs no
        # log or exp. The history horizon is recomputed only when a prune is due.
        self._median = 1024.0
        self._up = math.exp(self.MEDIAN_STEP)
        self._down = math.exp(-self.MEDIAN_STEP)
        self._horizon = self._horizon_now()
        self._eps = min(1.0, max(1e-6, self.INITIAL_ADMIT))
        self._credit = 0.0
        # The previous call, for run tracking: key, position, whether it was an insert.
        self._last_key: bytes | None = None
        self._last_pos = -1
        self._last_insert = False
        self._run_admitted = True
        # Victims handed out by the latest select_victims: a remove() of one of them is an
        # eviction (and feeds the pacing); a remove() of another key is a Remove or a Flush.
        self._selected: set[bytes] = set()

    # ------------------------------------------------------------------ bookkeeping

    @property
    def admit_fraction(self) -> float:
        """Current admission probability of a first-seen block (1.0 = admit all, like LRU)."""
        return self._eps

    @property
    def median_reuse_distance(self) -> float:
        return self._median

    def _horizon_now(self) -> int:
        return max(self.HISTORY_MIN, int(self.HISTORY_MULT * self._median))

    def _maybe_prune(self, now: int) -> None:
        """Forget history older than the horizon, once per horizon of ticks."""
        self._horizon = horizon = self._horizon_now()
        if now - self._pruned_at >= horizon:
            cut = now - horizon
            self._history = {k: t for k, t in self._history.items() if t >= cut}
            self._pruned_at = now

    def _reference(self, key: bytes) -> bool:
        """Record a reference; return whether the key was referenced before (within the horizon)."""
        self._tick += 1
        now = self._tick
        before = self._history.get(key)
        if before is not None:
            # Streaming median (stochastic approximation) of the reuse distance.
            self._median *= self._up if now - before > self._median else self._down
        self._history[key] = now
        if now - self._pruned_at >= self._horizon:
            self._maybe_prune(now)
        return before is not None

    def _end_run(self, position: int) -> None:
        """A call at ``position`` arrives: if it starts a new run, the previous run's tail is a leaf."""
        last = self._last_key
        if last is None or position < 0 or self._last_pos < 0 or position > self._last_pos:
            return
        q = self._where.get(last)
        if q is not None:
            del q[last]
            self._prob[last] = self._tick
            self._prob.move_to_end(last, last=False)
            self._where[last] = self._prob

    def _place(self, key: bytes, queue: OrderedDict[bytes, int]) -> None:
        old = self._where.get(key)
        if old is not None:
            del old[key]
        queue[key] = self._tick
        self._where[key] = queue

    # ------------------------------------------------------------------ the protocol

    def insert(self, key: bytes, info: BlockInfo) -> None:
        pos = info.position
        seen = self._reference(key)
        self._end_run(pos)
        continues = (
            self._last_insert and pos >= 1 and self._last_pos == pos - 1 and self._last_key is not None
        )
        self._credit = min(self._credit + self._eps, 64.0)
        if not continues:
            self._run_admitted = self._credit >= 0.0
        if seen:
            admitted = True
        else:
            admitted = self._run_admitted
            if admitted:
                self._credit -= 1.0
        self._place(key, self._main if admitted else self._prob)
        self._pos[key] = pos
        self._last_key, self._last_pos, self._last_insert = key, pos, True

    def access(self, key: bytes) -> None:
        if key not in self._where:
            return
        self._reference(key)
        pos = self._pos.get(key, -1)
        self._end_run(pos)
        self._place(key, self._main)
        self._last_key, self._last_pos, self._last_insert = key, pos, False

    def access_many(self, keys) -> None:
        """Exactly ``access`` of each key in order (tested), with the calls inlined and the
        hot state in locals (written back at the end, and before a prune reads it)."""
        where, pos_of, main, prob = self._where, self._pos, self._main, self._prob
        up, down = self._up, self._down
        history = self._history
        tick, median = self._tick, self._median
        last_key, last_pos = self._last_key, self._last_pos
        prune_at = self._pruned_at + self._horizon
        seen = False
        for key in keys:
            q = where.get(key)
            if q is None:
                continue
            seen = True
            tick += 1
            before = history.get(key)
            if before is not None:
                median *= up if tick - before > median else down
            history[key] = tick
            if tick >= prune_at:
                self._tick, self._median = tick, median
                self._maybe_prune(tick)
                history = self._history
                prune_at = self._pruned_at + self._horizon
            pos = pos_of.get(key, -1)
            if last_key is not None and pos >= 0 and last_pos >= 0 and pos <= last_pos:
                lq = where.get(last_key)
                if lq is not None:
                    del lq[last_key]
                    prob[last_key] = tick
                    prob.move_to_end(last_key, last=False)
                    where[last_key] = prob
                    if last_key == key:
                        q = prob
            del q[key]
            main[key] = tick
            where[key] = main
            last_key, last_pos = key, pos
        self._tick, self._median = tick, median
        if seen:
            self._last_key, self._last_pos, self._last_insert = last_key, last_pos, False

    def remove(self, key: bytes) -> None:
        q = self._where.pop(key, None)
        if q is None:
            return
        born = q.pop(key)
        self._pos.pop(key, None)
        if self._last_key == key:
            self._last_key = None
        if q is self._main and key in self._selected:
            # An eviction from main: pace admission by the age it reached.
            age = max(self._tick - born, 1)
            err = math.log(age / self._median)
            self._eps = min(1.0, max(1e-6, self._eps * math.exp(self.GAIN * max(-5.0, min(5.0, err)))))
        self._selected.discard(key)

    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        out: list[bytes] = []
        self._selected.clear()
        if count <= 0:
            return out
        for queue in (self._prob, self._main):
            for key in queue:
                if evictable(key):
                    out.append(key)
                    if len(out) >= count:
                        break
            if len(out) >= count:
                break
        self._selected.update(out)
        return out

    def __len__(self) -> int:
        return len(self._where)


def _age_bin(age: int) -> int:
    """Quarter-octave bin of an age in references: 0..3 exactly, then 4 bins per doubling."""
    e = age.bit_length() - 1
    if e < 2:
        return age if age > 0 else 0
    return 4 * e + ((age >> (e - 2)) & 3) - 4


def _age_bin_capped(age: int, bins: int) -> int:
    """:func:`_age_bin`, the last bin holding every older age."""
    b = _age_bin(age)
    return b if b < bins else bins - 1


_parent_of = attrgetter("parent")
_last_of = attrgetter("last")
_digest = xxhash.xxh3_128_digest
_NO_PARENT = b"\xff" * 16  # words -1, -1: no parent


def _as16(key: bytes) -> bytes:
    return key if len(key) == 16 else _digest(key)


def key_words(keys: list[bytes]) -> bytes:
    """The keys as the ``lhd`` kernels take them: 16 bytes each (two little-endian int64
    words), one after the other.

    A 16-byte key (the pool's block key, already a hash) is its own bytes; any other key is
    its 128-bit xxh3 digest. Two keys that shared words would share one id: for keys of 16
    bytes that cannot happen, and for others it takes a 128-bit collision. Even then only a
    choice of victim could suffer: the index checks every victim it is handed."""
    return _key_words(keys)[0]


def _key_words(keys: list[bytes]) -> tuple[bytes, bool]:
    """:func:`key_words`, and whether every key is 16 bytes long (its words are its bytes)."""
    buf = b"".join(keys)
    # All 16 bytes: the total is 16m and none is shorter (then none is longer either).
    if len(buf) != len(keys) << 4 or (keys and min(map(len, keys)) != 16):
        return b"".join(map(_as16, keys)), False
    return buf, True

#: ``kvpool.master.hit_density_kernels``, imported (and its kernels compiled or loaded from
#: numba's cache) only in a process that runs an ``lhd`` policy: importing numba takes
#: about half a second, which no process that never evicts should pay (the CLI, clients).
_kernels = None
_kernels_lock = threading.Lock()
_kernels_thread: threading.Thread | None = None


#: Positions in the kernels' ``meta`` array that the policy reads on every call, as plain
#: globals (set when the kernels load; the policy reads none before).
_NOW = _NSLOTS = _NRES = _DUE = 0


def _load_kernels() -> None:
    """Import and warm the kernels once; a caller meanwhile waits for the one loading them."""
    global _kernels, _NOW, _NSLOTS, _NRES, _DUE
    with _kernels_lock:
        if _kernels is None:
            from kvpool.master import hit_density_kernels as k

            k.warm_up()
            _NOW, _NSLOTS, _NRES, _DUE = k.NOW, k.NSLOTS, k.NRES, k.DUE
            _kernels = k


def _load_kernels_soon() -> None:
    """Start loading the kernels on a thread of their own (once)."""
    global _kernels_thread
    if _kernels is None and _kernels_thread is None:
        _kernels_thread = threading.Thread(target=_load_kernels, name="lhd-kernels")
        _kernels_thread.start()


def _aligned_rows(n: int, fields: int) -> np.ndarray:
    """Zeroed int64 rows of ``fields`` (8: 64 bytes) that start on 64-byte boundaries, so
    that a row is one cache line (numpy aligns large arrays to 16 bytes only)."""
    buf = np.zeros(n * fields + 8, np.int64)
    skip = (-buf.ctypes.data % 64) // 8
    return buf[skip : skip + n * fields].reshape(n, fields)


def _bin_start(b: int) -> int:
    """The smallest age in bin ``b`` (inverse of :func:`_age_bin`)."""
    if b < 4:
        return b
    e, f = divmod(b + 4, 4)
    return (4 + f) << (e - 2)


class HitDensityPolicy(EvictionPolicy):
    """Learned hit density, prefix-aware and leaf-first ("lhd", the default).

    The idea is LHD (Beckmann, Chen and Cidon, NSDI '18): a block is worth its expected future
    hits per unit of cache space-time, and the policy evicts the sampled block worth least.
    What this policy adds for a prefix cache is *where it learns from* and *what it may
    evict*.

    **Classes.** Every reference (an insert or a hit) starts an *interval* that ends at the
    key's next reference. The interval's class is a pair of features the master knows:
    how many times the key was referenced so far (buckets 1, 2-3, 4-7, 8+) and whether the
    block ended the chain its writer published (``BlockInfo.last``: a request's last block
    is the one the next turn rewrites, so it is reused far less often; the policy does not
    assume that, it learns it per class).

    **Learning from a long history, not from the cache.** The policy keeps a *history*: the
    last reference tick, reference count and last flag of every recently referenced key,
    resident or not. When a key in the history is referenced again, that is a reuse at
    distance ``now - last`` for the class of the interval that ends. Keys that leave the
    history unreused, and keys still in it, are *censored* at their age: known to survive
    that long, fate unknown. Per class and age bin, the hazard ``h(a)`` (reuse at age ``a``
    given survival to ``a``) is a Kaplan-Meier estimate from those counts, so the reuse
    distributions are learned from the reference stream itself, up to ages far beyond what a
    small cache ever keeps: a small cache can learn that what it evicts young would have
    been reused at age 9,000, which is what lets it behave like admission control.

    **Density.** For a block of class ``c`` at age ``a``, with survival ``S`` from ``a``
    built from ``h``, keeping it until age ``T`` yields ``(1 - S(T)) / sum(S over [a, T))``
    hits per unit of space-time. Its density is the best such ratio over ``T``. This ranks
    blocks without knowing the capacity: a cache keeps the blocks whose density is above
    the price its size sets, so a small one keeps few blocks that are near their likely
    reuse (and evicts fresh ones: admission control) and a large one evicts only what is
    unlikely to be reused at all (close to LRU). A class/age cell with no observations yet
    borrows the hazard pooled over all classes (one pseudo-observation), and ages beyond
    the history have density 0. Before anything is learned all densities are equal and
    ties go to the oldest block: the policy starts as LRU.

    **Leaf-first.** The index tells the policy each block's parent (the block before it in
    the chain of one put). Only leaves, blocks with no resident child, are candidates, so
    a non-recency order can never cut a chain in the middle and strand its tail. When a
    victim's parent becomes a leaf it joins the candidates of the same call. Only when no
    leaf is evictable (a pinned child) may an interior block go.

    **Cost and memory.** Every key the policy knows, resident or only remembered, has a
    dense integer id; everything about it (history entry, tick, class, parent, children,
    leaf position, flags, and the key itself as two 64-bit words) is one 80-byte row of a
    numpy array indexed by id, and ids are found from keys in an open-addressing table next
    to it (``kvpool.master.hit_density_kernels`` states the layout). Each call of the index
    is one batch (one put, one lease, one eviction's removals, one selection) and one call of
    a compiled kernel that does the whole batch's per-block work: key lookups, a key listed
    twice, random draws, age bins (from the position of the top bit). Python joins the
    batch's keys into one buffer around it, and reads the victims' keys back from their
    words (a key of another length than 16 bytes is kept in a dict by id, since its words
    are a digest). The removal of the victims just handed out goes by id, without lookups, and
    without a call of its own: the next call's kernel does it first (an insert, usually). A
    trim frees ids highest first, so that a put's new blocks take neighbouring rows.
    Densities are recomputed when half as many references as the history holds have been
    made since the last time, and at least ``REFRESH_MIN`` (amortized O(1) per reference).
    Victims are chosen among ``SAMPLES`` random leaves per requested victim (all leaves when
    there are fewer), scored from the leaf list's own copy of their class and tick.
    Measured by ``kvpool replay`` (``us_per_ref``) on the FAST'25 conversation trace, on the
    shared 2-core development machine: about 1.1 to 1.8 us of master CPU per block reference
    depending on the capacity and the machine's load, more on traffic of shorter requests
    (each call has a fixed part); the README's eviction section has the runs. The history
    is trimmed to ``max(HISTORY_MIN, HISTORY_PER_BLOCK x resident blocks)`` keys, never
    more than ``HISTORY_MAX``, at each recomputation (the oldest last references leave
    first), so it holds at most 1.5x that. The arrays are made for
    ``2 x HISTORY_MIN`` ids at once (24 MiB, whose pages are touched only as ids are used)
    and grow by doubling beyond. About 170 to 220 bytes a remembered key (the row, the
    table cells, the free list, and the slack of arrays grown by doubling; measured with
    tracemalloc; the policy holds no key object of 16 bytes), under 1 GiB at the cap, which
    only a tier of a million blocks reaches.

    Constants, each with its reason (none was fitted to a trace):

    * ``SAMPLES = 64`` candidates per victim: LHD's sample size; the victim is then in the
      lowest ~1/65 of densities in expectation, close to a full sort at a fraction of it.
    * Age bins: 4 per doubling, up to 2^32 references. Reuse distances span many orders of
      magnitude, so bins are logarithmic; a quarter octave (19% wide) resolves a reuse peak
      while keeping ~130 bins per class, few enough to fill with data.
    * ``HISTORY_PER_BLOCK = 4``: the history must remember keys for longer than the cache
      keeps them, or old blocks look worthless. A block in a cache of C blocks lives about
      C / (miss ratio) references; 4 x C covers miss ratios down to 25%. ``HISTORY_MIN =
      2**17`` keys (about 20 MiB) so that a small cache still learns reuse far beyond its own
      size, which is the whole point; it is a memory budget, not a fit. ``HISTORY_MAX =
      2**22`` bounds memory for huge tiers.
    * Reference-count buckets in powers of two (1, 2-3, 4-7, 8+): reuse probability grows
      with past references and flattens out; doubling buckets keep four classes populated.
    * Statistics are halved each time as many intervals have ended as the history holds,
      so the policy remembers about two histories' worth of traffic and follows changes in
      the workload at the pace its memory allows.
    * One pseudo-observation of the pooled hazard per cell: the weakest prior that keeps
      an empty cell defined; a cell with data is dominated by its own counts.
    * ``REFRESH_MIN = 256`` references between two recomputations at least: a density pass
      costs O(classes x bins^2), about a millisecond, so this bounds it near a few
      microseconds per reference while the history is tiny; the first densities come
      after 256 references, so learning starts almost at once.
    """

    name = "lhd"

    SAMPLES: ClassVar[int] = 64
    BINS: ClassVar[int] = 4 * 32 - 4
    HISTORY_MIN: ClassVar[int] = 1 << 17
    HISTORY_PER_BLOCK: ClassVar[int] = 4
    HISTORY_MAX: ClassVar[int] = 1 << 22
    COUNT_BUCKETS: ClassVar[int] = 4
    PRIOR: ClassVar[float] = 1.0
    #: The smallest number of references between two recomputations of the densities.
    REFRESH_MIN: ClassVar[int] = 256

    # A history value packs the key's last reference tick, its reference count (capped at
    # 255) and its last-block flag into one int: tick << 9 | count << 1 | last.
    _T_SHIFT = 9

    @classmethod
    def prepare(cls, wait: bool = False) -> None:
        if wait:
            _load_kernels()
        else:
            _load_kernels_soon()

    def __init__(self, seed: int = 0) -> None:
        nb = self.BINS
        self._nclasses = nc = 2 * self.COUNT_BUCKETS
        #: Class of (count, last): 2 * bucket(count) + last.
        self._bucket = [2 * min(max(c, 1).bit_length() - 1, self.COUNT_BUCKETS - 1) for c in range(256)]
        #: First cell of the rank table's row for a count (last flag 0; add BINS for 1).
        self._bucket_np = np.array(self._bucket, np.int64)
        self._row = self._bucket_np * nb
        starts = np.array([_bin_start(b) for b in range(nb + 1)], dtype=np.int64)
        self._edges = starts[1:nb]  # searchsorted(edges, age, "right") == _age_bin(age), capped
        self._width = (starts[1:] - starts[:-1]).astype(np.float64)
        self._reused = np.zeros((nc, nb))     # intervals that ended in a reuse, by class and age bin
        self._censored = np.zeros((nc, nb))   # intervals that left the history unreused
        self._ended = 0                       # intervals counted since the last halving
        self._pending = np.zeros(nc * nb, np.int64)  # reuses not yet folded in, by cell
        self._rank = np.zeros(nc * nb, np.int64)  # density rank of each (class, bin) cell
        self._refresh_at = self.REFRESH_MIN
        # Every key the policy knows (resident or remembered) has an id, found from the key's
        # words in the kernels' table; the rest of its state is in the kernels' arrays (see
        # kvpool.master.hit_density_kernels). A victim's key is read back from its words (``_key_bytes``, a view of them as
        # 16-byte records) when it is 16 bytes long. Any other key (its words are a digest)
        # is kept here by id from each insert of it until the id loses the key (moved or
        # forgotten), so every resident one is here.
        self._long: dict[int, bytes] = {}
        # The arrays are made once the kernels are loaded (the index loads them when it is
        # built; a policy made before starts loading them on a thread of their own): calls
        # made before are kept in order and replayed then.
        self._backlog: list[tuple] | None = []
        self._rank40 = self._rank << 40  # the sort key's high part: rank << 40, plus the tick
        self._seed = seed  # the kernels' random stream (SplitMix64) starts from it
        self._no_ids = np.zeros(0, np.int64)
        self._no_words = key_words([])
        # The last victims handed out, with their ids: the index removes them next, and the
        # removal then needs no lookups. Any other call clears it.
        self._victims: tuple[list[bytes], np.ndarray] | None = None
        # The ids of those victims once the index said they are gone, until the next call
        # removes them (an insert, the usual next call, in its own kernel call; any other
        # call first, in one of its own): ``remove_many`` then costs no kernel call.
        self._dead: np.ndarray | None = None
        self._attach(wait=False)

    def _attach(self, wait: bool) -> bool:
        """Make the state arrays if the kernels are loaded (with ``wait``, load them now),
        then replay the calls kept meanwhile. Returns whether the policy is attached."""
        if self._backlog is None:
            return True
        if _kernels is None:
            if not wait:
                _load_kernels_soon()
                return False
            _load_kernels()
        backlog, self._backlog = self._backlog, None
        self._st = np.zeros((0, _kernels.FIELDS), np.int64)
        self._words = np.zeros((0, 2), np.int64)
        self._tab = np.zeros(0, np.int32)
        self._leaves = np.zeros((64, 2), np.int64)  # leaf ids, each with its class << 40 | tick
        self._free = np.zeros(0, np.int64)
        self._meta = np.zeros(_kernels.META, np.int64)
        self._meta[_kernels.RNG] = self._seed
        self._ids = np.zeros(64, np.int64)  # scratch of one call: ids, or (id, new id) pairs
        self._out = np.zeros(64, np.int64)
        # Room for the history's floor and the half more it grows by between two trims, made
        # once: growing by doubling up to there would copy the state ~8 times meanwhile.
        # The pages of rows never used are never touched (numpy's zeros map them lazily).
        self._grow(2 * self.HISTORY_MIN)
        for call, *args in backlog:
            getattr(self, call)(*args)
        return True

    def _grow(self, size: int) -> None:
        old = self._st.shape[0]
        st = _aligned_rows(size, _kernels.FIELDS)  # a new id's row is set when it is given
        st[:old] = self._st
        self._st = st
        words = np.zeros((size, 2), np.int64)
        words[:old] = self._words
        self._words = words
        self._key_bytes = words.view("V16").reshape(size)
        free = np.zeros(size, np.int64)
        free[:old] = self._free
        self._free = free
        # The table stays at most half full: at least twice as many cells as ids.
        self._tab = np.zeros(1 << (2 * size - 1).bit_length(), np.int32)
        _kernels.rehash(st, words, self._tab, self._meta)

    def _make_room(self, m: int, resident: bool = False) -> None:
        """Room for ``m`` more ids, and with ``resident`` for ``m`` more leaves (there are
        never more leaves than resident blocks). The kernels never grow an array: a call
        that may not fit returns ``NEED_ROOM`` having changed nothing, and is made again
        after this."""
        meta = self._meta
        need = int(meta[_NSLOTS]) + m
        if need > self._st.shape[0]:
            self._grow(max(need, 2 * self._st.shape[0]))
        if resident:
            need = int(meta[_NRES]) + m
            if need > len(self._leaves):
                leaves = np.zeros((max(need, 2 * len(self._leaves)), 2), np.int64)
                leaves[: len(self._leaves)] = self._leaves
                self._leaves = leaves

    def _scratch(self, n: int) -> np.ndarray:
        """The scratch array, at least ``n`` long."""
        if n > len(self._ids):
            self._ids = np.zeros(max(n, 2 * len(self._ids)), np.int64)
        return self._ids

    def _scratch_out(self, n: int) -> np.ndarray:
        """The array a selection writes its victims' ids to, at least ``n`` long. The last
        selection's victims are a view of it (``_victims``): only a selection writes it, and
        each one replaces them."""
        if n > len(self._out):
            self._out = np.zeros(max(n, 2 * len(self._out)), np.int64)
        return self._out

    def _forget(self, ids: np.ndarray) -> None:
        """Drop the keys of ids the kernels freed."""
        if self._long:
            for s in ids.tolist():
                self._long.pop(s, None)

    def _keys_of(self, ids: np.ndarray) -> list[bytes]:
        """The keys of ``ids`` (which have keys)."""
        keys = self._key_bytes[ids].tolist()
        if self._long:
            long = self._long
            for j, s in enumerate(ids.tolist()):
                if s in long:
                    keys[j] = long[s]
        return keys

    # ------------------------------------------------------------------ introspection

    @property
    def _now(self) -> int:
        """References so far (the policy's clock)."""
        self._attach(wait=True)
        return int(self._meta[_kernels.NOW])

    @property
    def history_len(self) -> int:
        self._attach(wait=True)
        return int(self._meta[_kernels.NHIST])

    @property
    def history_cap(self) -> int:
        return min(self.HISTORY_MAX, max(self.HISTORY_MIN, self.HISTORY_PER_BLOCK * len(self)))

    def density(self, key: bytes) -> float:
        """The current density rank of a resident block (higher is kept longer); for tests."""
        self._attach(wait=True)
        if self._dead is not None:
            self._remove_dead()
        ids = np.empty(1, np.int64)
        _kernels.find(self._words, self._tab, key_words([key]), ids)
        s = int(ids[0])
        if s < 0 or not self._st[s, _kernels.FLAGS] & _kernels.F_RES:
            raise KeyError(key)
        age = self._now - int(self._st[s, _kernels.TICK])
        return float(self._rank[int(self._st[s, _kernels.CLS]) + min(_age_bin(age), self.BINS - 1)])

    def __len__(self) -> int:
        if self._backlog is not None:
            self._attach(wait=True)
        # Victims said gone are gone, though the next call removes them from the arrays.
        return int(self._meta[_NRES]) - (0 if self._dead is None else len(self._dead))

    def _remove_dead(self) -> None:
        """Remove the victims that ``remove_many`` left to the next call (see ``_dead``)."""
        dead, self._dead = self._dead, None
        self._remove(self._no_words, dead, len(dead))  # (no long keys: nothing to forget)

    def _remove(self, kw: bytes, ids: np.ndarray, m: int) -> tuple[int, np.ndarray]:
        """The remove kernel on ``m`` keys (``kw``) or ids, making room first if it asks for
        it (a dead block's key moves to a new id); returns its count and ``moved`` pairs."""
        moved = self._ids if 2 * m <= len(self._ids) else self._scratch(2 * m)
        n = _kernels.remove(self._st, self._words, self._tab, self._leaves, self._free, self._meta, kw, ids, moved)
        if n == _kernels.NEED_ROOM:
            self._make_room(m)
            moved = self._scratch(2 * m)
            n = _kernels.remove(self._st, self._words, self._tab, self._leaves, self._free, self._meta, kw, ids, moved)
        return n, moved

    # ------------------------------------------------------------------ references

    def insert(self, key: bytes, info: BlockInfo) -> None:
        self.insert_many((key,), (info,))

    def insert_many(self, keys, infos) -> None:
        if self._backlog is not None and not self._attach(wait=False):
            self._backlog.append(("insert_many", list(keys), list(infos)))
            return
        self._victims = None
        if type(keys) is not list:
            keys = list(keys)
        if type(infos) is not list:
            infos = list(infos)
        m = len(keys)
        if not m:
            return
        # The keys' words, then their parents': a put's chain (each block's parent the one
        # before it, the usual case) passes only its head's parent, any other batch every one.
        parents = list(map(_parent_of, infos))
        chain = parents[1:] == keys[:-1]
        if chain:
            tail = [_NO_PARENT if parents[0] is None else parents[0]]
        else:
            tail = [_NO_PARENT if p is None else p for p in parents]
        kw, plain = _key_words(keys + tail)
        lasts = bytes(map(_last_of, infos))
        ids = self._ids if m <= len(self._ids) else self._scratch(m)
        meta = self._meta
        dead = self._dead  # removed by the kernel's first call, before the batch
        if dead is None:
            dead = self._no_ids
        i = 0
        while i < m:  # the kernel stops where a refresh is due, as one-at-a-time inserts would
            i = _kernels.insert(self._st, self._words, self._tab, self._leaves, self._free, meta, self._pending, self._row,
                                self.BINS, kw, lasts, chain, i, self._refresh_at, ids, dead)
            if i == _kernels.NEED_ROOM:  # nothing changed, the dead not removed either
                self._make_room(m + len(dead), resident=True)
                i = 0
                continue
            self._dead = None
            dead = self._no_ids
            if i < 0:
                self._one_by_one(keys, infos)  # a key is resident already, or listed twice
                return
            if i >= _DUE:
                i -= _DUE
                self._refresh()  # (a trim forgets no resident key: the new ones are safe)
        if not plain:  # keys whose words are a digest are kept, for when they are victims
            long = self._long
            for s, key in zip(ids[:m].tolist(), keys):
                if len(key) != 16:
                    long[s] = key

    def _one_by_one(self, keys: list[bytes], infos: list[BlockInfo]) -> None:
        """Not a plain batch of keys to make resident: each key removed, then inserted."""
        for key, info in zip(keys, infos):
            self.remove(key)
            self.insert_many([key], [info])

    def access(self, key: bytes) -> None:
        self.access_many((key,))

    def access_many(self, keys) -> None:
        if self._backlog is not None and not self._attach(wait=False):
            self._backlog.append(("access_many", list(keys)))
            return
        self._victims = None
        if type(keys) is not list:
            keys = list(keys)
        m = len(keys)
        if not m:
            return
        if self._dead is not None:
            self._remove_dead()
        kw = key_words(keys)
        ids = self._ids if m <= len(self._ids) else self._scratch(m)
        i = 0
        while i < m:  # a refresh exactly where one-at-a-time accesses would make it
            i = _kernels.access(self._st, self._words, self._tab, self._leaves, self._meta, self._pending, self._row,
                                self.BINS, kw, i, self._refresh_at, ids)
            if i >= _DUE:
                i -= _DUE
                self._refresh()

    def remove(self, key: bytes) -> None:
        self.remove_many((key,))

    def remove_many(self, keys) -> None:
        """Exactly ``remove`` of each key in order (tested): an eviction's victims are mostly
        a chain peeled from its tail, one parent after its child."""
        if type(keys) is not list:
            keys = list(keys)
        if self._backlog is not None and not self._attach(wait=False):
            self._backlog.append(("remove_many", keys))
            return
        m = len(keys)
        if not m:
            return
        victims, self._victims = self._victims, None
        if victims is not None and keys == victims[0]:  # no call moved an id since they were chosen
            if self._dead is None and not self._long:  # (a key of another length would need its moved id)
                self._dead = victims[1]  # the next call removes them
                return
            kw, ids = self._no_words, victims[1]
        else:
            kw, ids = key_words(keys), self._no_ids
        if self._dead is not None:
            self._remove_dead()
        n, moved = self._remove(kw, ids, m)
        if n > 0 and self._long:
            self._forget(moved[: 2 * n : 2])  # ids that lost their key (not resident: no victims)

    # ------------------------------------------------------------------ learning

    def _refresh(self) -> None:
        """Fold new reuses in, trim the history (censoring what leaves), recompute densities."""
        nb, nc = self.BINS, self._nclasses
        meta = self._meta
        if meta[_kernels.NPENDING]:
            self._reused += self._pending.reshape(nc, nb)
            self._ended += int(meta[_kernels.NPENDING])
            self._pending[:] = 0
            meta[_kernels.NPENDING] = 0
        now = self._now
        cap = self.history_cap
        if meta[_kernels.NHIST] > cap:
            hval = self._st[: int(meta[_kernels.NSLOTS]), _kernels.HVAL]
            remembered = np.flatnonzero(hval)
            values = hval[remembered]
            # The oldest entries leave, down to 7/8 of the cap: the smallest last-reference
            # ticks (each is unique: one tick per reference).
            drop = len(values) - cap + cap // 8
            oldest = np.argpartition(values, drop - 1)[:drop]  # the tick is the high part
            gone = np.sort(remembered[oldest])[::-1].copy()  # freed highest first: new ids come out in ascending order
            self._censored += self._cells(values[oldest], now)
            self._ended += drop
            forgotten = np.empty(drop, np.int64)
            nf = _kernels.trim(self._st, self._words, self._tab, self._free, meta, gone, forgotten)
            self._forget(forgotten[:nf])
        cells = np.zeros(nc * nb, np.int64)
        remembered = _kernels.history_cells(self._st, meta, self._bucket_np, nb, cells)
        if self._ended > remembered:
            self._reused *= 0.5
            self._censored *= 0.5
            self._ended //= 2
        alive = cells.reshape(nc, nb).astype(np.float64)
        self._rank = self._ranks(self.densities(self._reused, self._reused + self._censored + alive))
        self._rank40 = self._rank << 40
        self._refresh_at = now + max(self.REFRESH_MIN, remembered // 2)

    def _cells(self, values: np.ndarray, now: int) -> np.ndarray:
        """Histogram of history values by (class, age bin)."""
        nb, nc = self.BINS, self._nclasses
        if len(values) == 0:
            return np.zeros((nc, nb))
        cls = np.asarray(self._bucket)[(values >> 1) & 0xFF] + (values & 1)
        bins = np.searchsorted(self._edges, now - (values >> 9), "right")
        return np.bincount(cls * nb + bins, minlength=nc * nb).reshape(nc, nb).astype(np.float64)

    def densities(self, reused: np.ndarray, exits: np.ndarray) -> np.ndarray:
        """Hit density per (class, age bin) from reuse counts and all interval exits (reused,
        censored or still open) by the bin they ended in: Kaplan-Meier hazards, then the best
        hits per space-time over every horizon.

        With survival ``S`` and cumulative space-time ``C`` (both from age 0, at bin starts),
        keeping a block from bin ``i`` to bin ``T`` gives ``(S[i] - S[T]) / (C[T] - C[i])``.
        Hazards are capped at 0.99 so that ``S`` stays representable over every bin."""
        density = np.zeros(reused.shape)
        curves = self._curves(reused, exits)
        if curves is not None:
            _kernels.best_ratios(*curves, density)  # the best ratio over every horizon T > i
        return density

    def _curves(self, reused: np.ndarray, exits: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Survival ``S`` and cumulative space-time ``C`` per class at the starts of bins
        ``0..top`` (``top``: one past the oldest bin anything was observed in), or None when
        nothing was."""
        nc = reused.shape[0]
        at_risk = np.cumsum(exits[:, ::-1], axis=1)[:, ::-1]
        seen = np.nonzero(at_risk.sum(0) > 0)[0]
        if len(seen) == 0:
            return None
        top = int(seen[-1]) + 1  # past the oldest age ever observed nothing is known: density 0
        reused, at_risk = reused[:, :top], at_risk[:, :top]
        pooled = reused.sum(0) / np.maximum(at_risk.sum(0), 1e-300)
        hazard = np.clip((reused + self.PRIOR * pooled) / (at_risk + self.PRIOR), 0.0, 0.99)
        surv = np.exp(np.concatenate([np.zeros((nc, 1)), np.cumsum(np.log1p(-hazard), axis=1)], axis=1))
        spacetime = np.concatenate(
            [np.zeros((nc, 1)), np.cumsum(self._width[:top] * 0.5 * (surv[:, :-1] + surv[:, 1:]), axis=1)], axis=1)
        return surv, spacetime, top

    @staticmethod
    def _ranks(dens: np.ndarray) -> np.ndarray:
        """Dense ranks of the density cells (equal densities share a rank: age breaks ties)."""
        flat = dens.reshape(-1)
        order = np.argsort(flat, kind="stable")
        rank = np.empty(len(flat), np.int64)
        rank[order] = np.concatenate([[0], np.cumsum(np.diff(flat[order]) > 0)])
        return rank

    # ------------------------------------------------------------------ victims

    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        """Up to ``count`` victims, best first: the leaves with the lowest density rank (then
        the oldest) among ``SAMPLES`` random leaves per victim asked (every leaf when there
        are at most ``2 * count + 16``, or ``SAMPLES * count`` or more); a victim's parent that
        becomes a leaf competes at once; interior blocks only when no leaf is evictable.

        The compiled walk does not call back into Python: it proposes victims assuming that
        every key not yet refused is evictable; they are checked here, and a refused key is
        marked and the walk made again, until all it proposes are accepted. That is the
        walk that asks ``evictable`` of each key as it meets it, since a key's answer does
        not change within one call."""
        if count <= 0:
            return []
        if self._backlog is not None:
            self._attach(wait=True)
        if self._dead is not None:  # (they are a view of ``_out``, which this call rewrites)
            self._remove_dead()
        meta = self._meta
        out = self._out if count <= len(self._out) else self._scratch_out(count)
        chosen = out[: _kernels.choose(self._st, self._leaves, meta, self._rank40, self.BINS, self.SAMPLES, count, out)]
        victims = self._key_bytes[chosen].tolist() if not self._long else self._keys_of(chosen)
        if all(map(evictable, victims)):  # the usual case: nothing is refused
            self._victims = (victims, chosen)
            return victims
        st = self._st
        refused: list[int] = []
        try:
            while True:
                verdicts = list(map(evictable, victims))
                if all(verdicts):
                    self._victims = (victims, chosen)
                    return victims
                for s, ok in zip(chosen.tolist(), verdicts):
                    if not ok:
                        st[s, _kernels.FLAGS] |= _kernels.F_BLOCKED
                        refused.append(s)
                meta[_kernels.RNG] = meta[_kernels.RNG0]  # the walk made again draws the same sample
                chosen = out[: _kernels.choose(st, self._leaves, meta, self._rank40, self.BINS, self.SAMPLES, count, out)]
                victims = self._keys_of(chosen)
        finally:
            if refused:
                st[refused, _kernels.FLAGS] &= ~_kernels.F_BLOCKED


class FIFOPolicy(LRUPolicy):
    """First in, first out: hits do not reorder. A reference point for replays and tests."""

    name = "fifo"

    def access(self, key: bytes) -> None:
        pass

    def access_many(self, keys) -> None:
        pass


class MRUPolicy(LRUPolicy):
    """Most recently used first: the classic winner on loops larger than the cache. A
    reference point for replays and tests, never a policy to run."""

    name = "mru"

    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        out: list[bytes] = []
        for key in reversed(self._order):
            if len(out) >= count:
                break
            if evictable(key):
                out.append(key)
        return out


class LFUPolicy(EvictionPolicy):
    """Least frequently used first (ties: least recently used), with counts forgotten when a
    block leaves. A reference point for replays and tests."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[bytes, int] = {}
        self._tick: dict[bytes, int] = {}
        self._now = 0
        self._heap: list[tuple[int, int, bytes]] = []

    def insert(self, key: bytes, info: BlockInfo) -> None:
        self._count[key] = 0
        self.access(key)

    def access(self, key: bytes) -> None:
        if key in self._count:
            self._now += 1
            self._count[key] += 1
            self._tick[key] = self._now
            heapq.heappush(self._heap, (self._count[key], self._now, key))

    def remove(self, key: bytes) -> None:
        self._count.pop(key, None)
        self._tick.pop(key, None)

    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        out: list[bytes] = []
        skipped = []
        while self._heap and len(out) < count:
            entry = heapq.heappop(self._heap)
            c, t, key = entry
            if self._tick.get(key) != t:
                continue  # stale
            skipped.append(entry)
            if evictable(key):
                out.append(key)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._count) + 64:
            self._heap = [(self._count[k], t, k) for k, t in self._tick.items()]
            heapq.heapify(self._heap)
        return out

    def __len__(self) -> int:
        return len(self._count)


#: Policies by name, for ``--eviction-policy`` and ``kvpool replay --policy``.
POLICIES: dict[str, type[EvictionPolicy]] = {
    LRUPolicy.name: LRUPolicy,
    PacedAdmissionPolicy.name: PacedAdmissionPolicy,
    HitDensityPolicy.name: HitDensityPolicy,
    FIFOPolicy.name: FIFOPolicy,
    LFUPolicy.name: LFUPolicy,
    MRUPolicy.name: MRUPolicy,
}
#: The policy the master runs unless configured otherwise: learned hit density, measured
#: with ``tools/bench_replay.py`` on the FAST'25 conversation trace and on synthetic traces
#: of other shapes (see the README's eviction section).
DEFAULT_POLICY = "lhd"


def make_policy(name: str | None = None) -> EvictionPolicy:
    name = name or DEFAULT_POLICY
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
