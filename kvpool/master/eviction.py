"""Eviction policies: which committed, unpinned blocks leave a tier first.

Protocol between the master's index and a policy:

* ``insert(key, info)`` when a block is committed (becomes resident in the tier);
* ``access(key)`` on every hit (Lookup, Get) of a resident block;
* ``remove(key)`` when a block leaves, whoever chose it (eviction, Remove, Flush);
* ``select_victims(count, evictable)`` returns up to ``count`` resident keys, best victim
  first, for which ``evictable(key)`` is true. It does not remove them: the index evicts
  what it takes and calls ``remove`` for each.

A policy only orders keys. It never frees memory and never sees leases or grants: the
``evictable`` predicate is how the index keeps leased and uncommitted blocks out of reach.
The replay tool (``kvpool replay``) drives these same classes through the same calls,
so what it measures is what the master runs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, ClassVar

__all__ = [
    "BlockInfo",
    "EvictionPolicy",
    "LRUPolicy",
    "PacedAdmissionPolicy",
    "POLICIES",
    "make_policy",
    "DEFAULT_POLICY",
]


@dataclass(frozen=True)
class BlockInfo:
    """What a policy may know about a block when it is inserted."""

    size: int
    #: Index of the block in its prefix chain (0 = first block of a prompt); -1 if unknown.
    position: int = -1
    namespace: str = ""


class EvictionPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def insert(self, key: bytes, info: BlockInfo) -> None: ...

    @abstractmethod
    def access(self, key: bytes) -> None: ...

    def access_many(self, keys) -> None:
        """``access`` of each key in order; policies override it to batch the work (a
        128K-token read touches 8,192 blocks at once)."""
        for key in keys:
            self.access(key)

    @abstractmethod
    def remove(self, key: bytes) -> None: ...

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


#: Policies by name, for ``--eviction-policy`` and ``kvpool replay --policy``.
POLICIES: dict[str, type[EvictionPolicy]] = {
    LRUPolicy.name: LRUPolicy,
    PacedAdmissionPolicy.name: PacedAdmissionPolicy,
}
#: The policy the master runs unless configured otherwise: measured on the FAST'25
#: conversation trace with ``tools/bench_replay.py`` (>= LRU at every capacity).
DEFAULT_POLICY = "paced"


def make_policy(name: str | None = None) -> EvictionPolicy:
    name = name or DEFAULT_POLICY
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
