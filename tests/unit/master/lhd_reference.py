"""The lhd policy as it was before its per-block work moved into compiled kernels, kept only
as a test oracle: the new implementation must take exactly the same decisions (same victims
in the same order, same learned state) on the same calls. Not part of the package."""

from __future__ import annotations

import heapq
from itertools import islice, repeat
from operator import itemgetter
from typing import Callable, ClassVar

import numpy as np

# The age bins and info accessors did not change with the kernels: the package's, shared.
from kvpool.master.eviction import (BlockInfo, EvictionPolicy, HitDensityPolicy, _age_bin, _age_bin_capped,
                                    _bin_start, _last_of, _parent_of)


#: A sort key above every real one (ranks are far below 2**60).
_NO_BOUND = 1 << 100


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

class ReferenceHitDensityPolicy(EvictionPolicy):
    """The former pure-Python ``HitDensityPolicy`` (see its docstring in
    kvpool/master/eviction.py: the same protocol, classes, density and constants)."""

    name = "lhd-reference"

    SAMPLES: ClassVar[int] = 64
    BINS: ClassVar[int] = 4 * 32 - 4
    HISTORY_MIN: ClassVar[int] = 1 << 17
    HISTORY_PER_BLOCK: ClassVar[int] = 4
    HISTORY_MAX: ClassVar[int] = 1 << 22
    COUNT_BUCKETS: ClassVar[int] = 4
    PRIOR: ClassVar[float] = 1.0
    #: The smallest number of references between two recomputations of the densities.
    REFRESH_MIN: ClassVar[int] = 256
    #: Ages below this read their bin from a table (a list for the per-block loops and an
    #: int8 copy for numpy, 1.1 MiB shared by all instances); older ones compute it. A
    #: speed/memory trade only: both give the same bin.
    BIN_LUT: ClassVar[int] = 1 << 17
    _bin_lut_shared: ClassVar[tuple[list[int], np.ndarray] | None] = None

    # A history value packs the key's last reference tick, its reference count (capped at
    # 255) and its last-block flag into one int: tick << 9 | count << 1 | last.
    _T_SHIFT = 9

    def __init__(self, seed: int = 0) -> None:
        nb = self.BINS
        self._nclasses = nc = 2 * self.COUNT_BUCKETS
        #: Class of (count, last): 2 * bucket(count) + last.
        self._bucket = [2 * min(max(c, 1).bit_length() - 1, self.COUNT_BUCKETS - 1) for c in range(256)]
        #: First cell of the rank table's row for a count (last flag 0; add BINS for 1).
        self._row = [b * nb for b in self._bucket]
        starts = np.array([_bin_start(b) for b in range(nb + 1)], dtype=np.int64)
        self._edges = starts[1:nb]  # searchsorted(edges, age, "right") == _age_bin(age), capped
        self._width = (starts[1:] - starts[:-1]).astype(np.float64)
        # Capped age bin of every age below BIN_LUT, read from a list in the per-block loops
        # (one index instead of the bit arithmetic of _age_bin); built once per class.
        if ReferenceHitDensityPolicy._bin_lut_shared is None:
            table = np.searchsorted(self._edges, np.arange(self.BIN_LUT), "right")
            ReferenceHitDensityPolicy._bin_lut_shared = (table.tolist(), table.astype(np.int8))
        self._bin_lut, self._bin_lut_np = ReferenceHitDensityPolicy._bin_lut_shared
        self._reused = np.zeros((nc, nb))     # intervals that ended in a reuse, by class and age bin
        self._censored = np.zeros((nc, nb))   # intervals that left the history unreused
        self._ended = 0                       # intervals counted since the last halving
        self._pending: list[int] = []         # reuses not yet added: class * BINS + bin
        self._rank = np.zeros(nc * nb, np.int64)  # density rank of each (class, bin) cell
        self._history: dict[bytes, int] = {}
        self._now = 0
        self._refresh_at = self.REFRESH_MIN
        # Resident blocks, by slot. Python lists for the per-reference work; numpy mirrors
        # of tick and class for the vectorized victim scoring, synced lazily from _dirty.
        self._slot: dict[bytes, int] = {}
        self._keys: list[bytes | None] = []
        self._tick: list[int] = []
        self._cls: list[int] = []     # class * BINS: the first cell of its row in the rank table
        self._kids: list[int] = []    # resident children
        self._parent: list[int] = []  # parent slot, -1 for none
        self._dead: list[bool] = []   # removed while it still had children: freed by the last
        self._leafpos: list[int] = []  # index in _leaves, -1 if not a leaf
        self._leaves: list[int] = []   # slots of the leaves, in no order (swap-remove)
        self._leaves_np = np.zeros(1024, np.int64)  # its numpy copy, for sampling and scoring
        self._leaf_moves: list[int] = []  # positions of _leaves written since the copy was synced
        self._free: list[int] = []
        self._dirty: list[int] = []
        self._tick_np = np.zeros(1024, np.int64)
        self._cls_np = np.zeros(1024, np.int64)
        self._rank40 = self._rank << 40  # the sort key's high part: rank << 40, plus the tick
        self._rank40_l: list[int] = self._rank40.tolist()
        self._rng_state = np.uint64(seed)  # SplitMix64, as the kernels draw

    # ------------------------------------------------------------------ introspection

    @property
    def history_len(self) -> int:
        return len(self._history)

    @property
    def history_cap(self) -> int:
        return min(self.HISTORY_MAX, max(self.HISTORY_MIN, self.HISTORY_PER_BLOCK * len(self._slot)))

    def density(self, key: bytes) -> float:
        """The current density rank of a resident block (higher is kept longer); for tests."""
        s = self._slot[key]
        return float(self._rank[self._cls[s] + min(_age_bin(self._now - self._tick[s]), self.BINS - 1)])

    def __len__(self) -> int:
        return len(self._slot)

    # ------------------------------------------------------------------ references

    def insert(self, key: bytes, info: BlockInfo) -> None:
        self.insert_many((key,), (info,))

    def insert_many(self, keys, infos) -> None:
        keys = list(keys)
        infos = list(infos)
        slot_of = self._slot
        if len(set(keys)) != len(keys) or any(map(slot_of.__contains__, keys)):
            for key, info in zip(keys, infos):  # not a plain batch of new keys: one at a time
                self.remove(key)
                self.insert_many([key], [info])
            return
        cut = self._refresh_at - self._now
        if cut < len(keys):  # refresh exactly where one-at-a-time inserts would
            self.insert_many(keys[:cut], infos[:cut])
            self.insert_many(keys[cut:], infos[cut:])
            return
        if len(keys) > 1 and list(map(_parent_of, islice(infos, 1, None))) == keys[:-1]:
            self._insert_chain(keys, infos)
            return
        # One pass: the reference (history, reuse statistics) and the slot, per key.
        history, pending, nb = self._history, self._pending, self.BINS
        olds = list(map(history.pop, keys, repeat(0)))
        kl, tl, cl, kids, par, dead, lpos, free = (
            self._keys, self._tick, self._cls, self._kids, self._parent, self._dead, self._leafpos, self._free)
        row, lut = self._row, self._bin_lut
        lut_n = len(lut)
        new: list[int] = []
        parents: list[int] = []
        values: list[int] = []
        now = self._now
        prev_key, prev_slot = None, -1
        for key, info, old in zip(keys, infos, olds):
            now += 1
            last = 1 if info.last else 0
            if old:
                count = (old >> 1) & 0xFF
                last = old & 1
                d = now - (old >> 9)
                pending.append(row[count] + last * nb + (lut[d] if d < lut_n else _age_bin_capped(d, nb)))
                if count < 255:
                    count += 1
            else:
                count = 1
            values.append((now << 9) | (count << 1) | last)
            c = row[count] + last * nb
            if free:  # a free slot has no children and is not dead (see remove)
                s = free.pop()
                kl[s] = key
                tl[s] = now
                cl[s] = c
            else:
                s = len(kl)
                kl.append(key)
                tl.append(now)
                cl.append(c)
                kids.append(0)
                par.append(-1)
                dead.append(False)
                lpos.append(-1)
            slot_of[key] = s
            parent = info.parent
            if parent is None:
                p = -1
            elif parent == prev_key:  # the usual case: the block before it in this batch
                p = prev_slot
                kids[p] += 1
            else:
                p = slot_of.get(parent, -1)
                if p >= 0:
                    kids[p] += 1
                    if lpos[p] >= 0:
                        parents.append(p)
            par[s] = p
            new.append(s)
            prev_key, prev_slot = key, s
        history.update(zip(keys, values))
        self._now = now
        leaves, moves = self._leaves, self._leaf_moves
        for p in parents:
            i = lpos[p]
            if i >= 0:
                moved = leaves.pop()
                if moved != p:
                    leaves[i] = moved
                    lpos[moved] = i
                    moves.append(i)
                lpos[p] = -1
        for s in new:
            if kids[s] == 0:
                lpos[s] = len(leaves)
                moves.append(len(leaves))
                leaves.append(s)
        self._dirty.extend(new)
        if self._now >= self._refresh_at:
            self._refresh()

    def _insert_chain(self, keys: list[bytes], infos: list[BlockInfo]) -> None:
        """``insert_many`` of new keys that form one chain (each block's parent is the block
        before it in the batch: one put's publish, the usual case), with the same result as
        the per-key pass: the per-key work is done list by list, so only a few stores per
        block are left in Python."""
        m = len(keys)
        history, pending, nb, row, lut = self._history, self._pending, self.BINS, self._row, self._bin_lut
        slot_of = self._slot
        kl, tl, cl, kids, par, dead, lpos, free = (
            self._keys, self._tick, self._cls, self._kids, self._parent, self._dead, self._leafpos, self._free)
        olds = list(map(history.pop, keys, repeat(0)))
        lasts = list(map(_last_of, infos))  # bools: 0 or 1 in the arithmetic below
        now = self._now
        ticks = range(now + 1, now + m + 1)
        if any(olds):
            lut_n = len(lut)
            values: list[int] = []
            classes: list[int] = []
            for t, old, last in zip(ticks, olds, lasts):
                if old:
                    count = (old >> 1) & 0xFF
                    last = old & 1
                    d = t - (old >> 9)
                    pending.append(row[count] + last * nb + (lut[d] if d < lut_n else _age_bin_capped(d, nb)))
                    if count < 255:
                        count += 1
                else:
                    count = 1
                values.append((t << 9) | (count << 1) | last)
                classes.append(row[count] + last * nb)
        else:  # all first references: count 1
            values = [(t << 9) | 2 | last for t, last in zip(ticks, lasts)]
            classes = list(map((row[1], row[1] + nb).__getitem__, lasts))
        # Slots: free ones in the order free.pop() hands them out, then new ones.
        nf = min(len(free), m)
        slots = free[len(free) - nf:]
        slots.reverse()
        del free[len(free) - nf:]
        extra = m - nf
        if extra:
            base = len(kl)
            kl.extend(repeat(None, extra))
            tl.extend(repeat(0, extra))
            cl.extend(repeat(0, extra))
            kids.extend(repeat(0, extra))
            par.extend(repeat(-1, extra))
            dead.extend(repeat(False, extra))
            lpos.extend(repeat(-1, extra))
            slots.extend(range(base, base + extra))
        # The chain's head: its parent, if resident, gains a child (and stops being a leaf).
        parent = infos[0].parent
        p0 = -1 if parent is None else slot_of.get(parent, -1)
        if p0 >= 0:
            kids[p0] += 1
        prevs = [p0]
        prevs += slots[:-1]
        # Stores by map: the per-block loop runs in C (any() only drains the Nones).
        any(map(kl.__setitem__, slots, keys))
        any(map(tl.__setitem__, slots, ticks))
        any(map(cl.__setitem__, slots, classes))
        any(map(par.__setitem__, slots, prevs))
        # A free or new slot has no children: each block but the tail has one, the next.
        any(map(kids.__setitem__, islice(slots, m - 1), repeat(1)))
        slot_of.update(zip(keys, slots))
        history.update(zip(keys, values))
        self._now = now + m
        leaves, moves = self._leaves, self._leaf_moves
        if p0 >= 0:
            i = lpos[p0]
            if i >= 0:
                moved = leaves.pop()
                if moved != p0:
                    leaves[i] = moved
                    lpos[moved] = i
                    moves.append(i)
                lpos[p0] = -1
        tail = slots[-1]
        lpos[tail] = len(leaves)
        moves.append(len(leaves))
        leaves.append(tail)
        self._dirty.extend(slots)
        if self._now >= self._refresh_at:
            self._refresh()

    def access(self, key: bytes) -> None:
        self.access_many((key,))

    def access_many(self, keys) -> None:
        get = self._slot.get
        keys = list(dict.fromkeys(keys))  # one reference per key per batch
        slots = list(map(get, keys))
        if None in slots:  # not resident here: not this tier's reference
            keys = [k for k, s in zip(keys, slots) if s is not None]
        if not keys:
            return
        cut = self._refresh_at - self._now
        if cut < len(keys):  # refresh exactly where one-at-a-time accesses would
            self.access_many(keys[:cut])
            self.access_many(keys[cut:])
            return
        # One pass per key: the reference (history, reuse statistics) and the slot's tick and
        # class. A key missing from the history (trimmed) starts again at count 1, not last.
        history, pending, row, nb, lut = self._history, self._pending, self._row, self.BINS, self._bin_lut
        lut_n = len(lut)
        if len(slots) != len(keys):
            slots = list(map(get, keys))
        olds = list(map(history.pop, keys, repeat(0)))
        tl, cl = self._tick, self._cls
        now = self._now
        values = []
        for s, old in zip(slots, olds):
            now += 1
            if old:
                count = (old >> 1) & 0xFF
                last = (old & 1) * nb
                d = now - (old >> 9)
                pending.append(row[count] + last + (lut[d] if d < lut_n else _age_bin_capped(d, nb)))
                if count < 255:
                    count += 1
                values.append((now << 9) | (count << 1) | (old & 1))
                cl[s] = row[count] + last
            else:
                values.append((now << 9) | 2)
                cl[s] = row[1]
            tl[s] = now
        history.update(zip(keys, values))
        self._now = now
        self._dirty.extend(slots)
        if now >= self._refresh_at:
            self._refresh()

    def remove(self, key: bytes) -> None:
        self.remove_many((key,))

    def remove_many(self, keys) -> None:
        """Exactly ``remove`` of each key in order (tested), with the state in locals: an
        eviction's victims are mostly a chain peeled from its tail, one parent after its child."""
        slots = list(map(self._slot.pop, keys, repeat(-1)))
        lpos, leaves, kids, kl, par, dead, free, moves = (
            self._leafpos, self._leaves, self._kids, self._keys, self._parent, self._dead, self._free,
            self._leaf_moves)
        for s in slots:
            if s < 0:
                continue
            kl[s] = None
            i = lpos[s]
            if i >= 0:
                lpos[s] = -1
                moved = leaves.pop()
                if moved != s:
                    leaves[i] = moved
                    lpos[moved] = i
                    moves.append(i)
            p = par[s]
            if p >= 0:
                left = kids[p] = kids[p] - 1
                if not left:
                    if dead[p]:
                        dead[p] = False
                        free.append(p)
                    else:
                        i = lpos[p] = len(leaves)
                        moves.append(i)
                        leaves.append(p)
            if kids[s]:
                dead[s] = True
            else:
                free.append(s)

    # ------------------------------------------------------------------ learning

    def _refresh(self) -> None:
        """Fold new reuses in, trim the history (censoring what leaves), recompute densities."""
        nb, nc = self.BINS, self._nclasses
        if self._pending:
            self._reused += np.bincount(self._pending, minlength=nc * nb).reshape(nc, nb)
            self._ended += len(self._pending)
            self._pending = []
        now = self._now
        history = self._history
        cap = self.history_cap
        if len(history) > cap:
            # Every reference re-inserts its key, so the dict is in order of last reference:
            # the oldest keys are its first ones. Drop down to 7/8 of the cap.
            drop = len(history) - cap + cap // 8
            # (keys, then values popped by map: no tuple per key, no Python loop)
            old = list(islice(history, drop))
            gone = np.fromiter(map(history.pop, old), dtype=np.int64, count=len(old))
            self._censored += self._cells(gone, now)
            self._ended += len(gone)
        values = np.fromiter(history.values(), dtype=np.int64, count=len(history))
        if self._ended > len(self._history):
            self._reused *= 0.5
            self._censored *= 0.5
            self._ended //= 2
        alive = self._cells(values, now)
        self._rank = self._ranks(self.densities(self._reused, self._reused + self._censored + alive))
        self._rank40 = self._rank << 40
        self._rank40_l = self._rank40.tolist()
        self._refresh_at = now + max(self.REFRESH_MIN, len(self._history) // 2)

    # The learning did not change with the kernels: the package's code, shared, except the
    # best-ratio pass of the densities, which is compiled there (``best_ratios``) and kept
    # here as the numpy broadcast it was.
    _cells = HitDensityPolicy._cells
    _curves = HitDensityPolicy._curves
    _ranks = staticmethod(HitDensityPolicy._ranks)

    def densities(self, reused: np.ndarray, exits: np.ndarray) -> np.ndarray:
        density = np.zeros(reused.shape)
        curves = self._curves(reused, exits)
        if curves is None:
            return density
        surv, spacetime, top = curves
        # ratio[c, i, T] for start bin i < top and end T in (i, top]
        gained = surv[:, :top, None] - surv[:, None, :]
        spent = spacetime[:, None, :] - spacetime[:, :top, None]
        later = np.arange(top + 1)[None, :] > np.arange(top)[:, None]
        ratio = np.where(later, gained / np.where(later, spent, 1.0), 0.0)
        density[:, :top] = ratio.max(axis=2)
        return density

    # ------------------------------------------------------------------ victims

    def _sync(self) -> None:
        """Copy ticks and classes changed since the last selection into the numpy mirrors."""
        n = len(self._keys)
        if n > len(self._tick_np):
            size = max(n, 2 * len(self._tick_np))
            self._tick_np = np.concatenate([self._tick_np, np.zeros(size - len(self._tick_np), np.int64)])
            self._cls_np = np.concatenate([self._cls_np, np.zeros(size - len(self._cls_np), np.int64)])
        dirty = self._dirty
        if dirty:
            idx = np.array(dirty, dtype=np.int64)
            self._tick_np[idx] = np.fromiter(map(self._tick.__getitem__, dirty), np.int64, len(dirty))
            self._cls_np[idx] = np.fromiter(map(self._cls.__getitem__, dirty), np.int64, len(dirty))
            dirty.clear()

    def _sync_leaves(self) -> np.ndarray:
        """The leaf list as a numpy array: only the positions written since the last call
        are copied."""
        leaves, moves = self._leaves, self._leaf_moves
        nl = len(leaves)
        if nl > len(self._leaves_np):
            grown = np.zeros(max(nl, 2 * len(self._leaves_np)), np.int64)
            grown[: len(self._leaves_np)] = self._leaves_np
            self._leaves_np = grown
        if moves:
            live = [i for i in moves if i < nl]
            if live:
                self._leaves_np[np.array(live, dtype=np.int64)] = np.fromiter(
                    map(leaves.__getitem__, live), np.int64, len(live))
            moves.clear()
        return self._leaves_np[:nl]

    def _random(self, n: int, high: int) -> np.ndarray:
        """``n`` ints in [0, high): SplitMix64 draws ``d`` (its state advancing by the golden
        gamma), each mapped to ``(d >> 32) * high >> 32``: the kernels' stream, vectorized."""
        states = self._rng_state + _GOLDEN * np.arange(1, n + 1, dtype=np.uint64)  # wraps mod 2**64
        self._rng_state = states[-1] if n else self._rng_state
        z = (states ^ (states >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        return ((z >> np.uint64(32)) * np.uint64(high) >> np.uint64(32)).astype(np.int64)

    def _sort_keys(self, slots: np.ndarray) -> np.ndarray:
        """One int64 per slot that sorts victims first: density rank, then older first (``rank << 40``
        plus the last reference tick: the key by age shifted by ``now``, the same order in a call)."""
        ticks = self._tick_np[slots]
        age = self._now - ticks
        if len(age) and np.maximum.reduce(age) < self.BIN_LUT:  # the usual case: bins from the table
            bins = self._bin_lut_np.take(age)
        else:
            bins = np.searchsorted(self._edges, age, "right")
        return self._rank40[self._cls_np[slots] + bins] + ticks

    def _ranked_few(self) -> tuple[list[int], list[int]]:
        """Every leaf with its sort key, best victim first, computed in Python: when there are
        few leaves, a dozen numpy calls cost more than the work itself. Same keys, same
        order (a stable sort of the leaf list) as the vectorized path."""
        now, nb, tl, cl, rank = self._now, self.BINS, self._tick, self._cls, self._rank40_l
        lut = self._bin_lut
        lut_n = len(lut)
        keyed = []
        for s in self._leaves:
            t = tl[s]
            a = now - t
            keyed.append((rank[cl[s] + (lut[a] if a < lut_n else _age_bin_capped(a, nb))] + t, s))
        keyed.sort(key=itemgetter(0))
        return [s for _, s in keyed], [k for k, _ in keyed]

    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        if count <= 0 or not self._slot:
            return []
        return self._choose(count, evictable, set())

    def _choose(self, count: int, evictable, taken: set) -> list[bytes]:
        """One selection pass: up to ``count`` victims not in ``taken``, best first."""
        nl = len(self._leaves)
        if nl <= 2 * count + 16:  # every leaf would be in the top k of the vectorized path
            cand_l, key_l = self._ranked_few()
            out = self._walk(cand_l, key_l, count, evictable, taken, True)
            if len(out) < count:
                taken = taken | set(out)
                self._sync()
                rest = np.array([s for s in self._slot.values() if self._keys[s] not in taken], dtype=np.int64)
                out += self._pick(rest, count - len(out), evictable, taken, leaves_only=False)
            if len(self._dirty) > len(self._keys):  # the mirrors are not read on this path: bound the backlog
                self._sync()
            if len(self._leaf_moves) > 4 * nl + 64:
                self._sync_leaves()
            return out
        self._sync()
        leaves_np = self._sync_leaves()
        sampled = self.SAMPLES * count < nl
        cand = leaves_np[self._random(self.SAMPLES * count, nl)] if sampled else leaves_np
        out = self._pick(cand, count, evictable, taken)
        if len(out) < count and sampled:  # the sample ran short (pinned blocks): every leaf
            out += self._pick(leaves_np, count - len(out), evictable, taken | set(out))
        if len(out) < count:  # no evictable leaf is left: interior blocks, as a last resort
            taken = taken | set(out)
            rest = np.array([s for s in self._slot.values() if self._keys[s] not in taken], dtype=np.int64)
            out += self._pick(rest, count - len(out), evictable, taken, leaves_only=False)
        return out

    def _pick(self, cand: np.ndarray, count: int, evictable, taken: set, leaves_only: bool = True) -> list[bytes]:
        """Up to ``count`` victims from ``cand``, best first; a victim's parent that becomes a
        leaf competes in the same call."""
        out: list[bytes] = []
        if len(cand) == 0:
            return out
        sort_key = self._sort_keys(cand)
        k = min(len(cand), 2 * count + 16)
        # One full sort (faster than a partition and a sort of its head at these sizes); each
        # pass walks its first k. Keys are unique per slot (ticks are), so the first k are
        # the same k slots, in the same order, whichever way they are found.
        order = np.argsort(sort_key, kind="stable")
        while True:
            top = order[:k]
            cand_l = cand[top].tolist()
            key_l = sort_key[top].tolist()
            out = self._walk(cand_l, key_l, count, evictable, taken, leaves_only)
            if len(out) >= count or k >= len(cand):
                return out
            k = min(len(cand), 4 * k)  # too many were pinned or taken: look further down


    def _walk(self, cand_l: list[int], key_l: list[int], count: int, evictable, taken: set,
              leaves_only: bool) -> list[bytes]:
        """Take victims from candidates sorted by key; a victim's parent that becomes a leaf
        competes at once."""
        heap: list[tuple[int, int]] = []
        keys, par, dead, kids, tl, cl, rank = (
            self._keys, self._parent, self._dead, self._kids, self._tick, self._cls, self._rank40_l)
        kids_left: dict[int, int] = {}
        seen: set[int] = set()
        nb, now = self.BINS, self._now
        lut = self._bin_lut
        lut_n = len(lut)
        i, n = 0, len(cand_l)
        out: list[bytes] = []
        while len(out) < count:
            if heap and (i >= n or heap[0][0] < key_l[i]):
                s = heapq.heappop(heap)[1]
            elif i < n:
                s = cand_l[i]
                i += 1
            else:
                break
            if s in seen:
                continue
            seen.add(s)
            key = keys[s]
            if key is None or key in taken or not evictable(key):
                continue
            out.append(key)
            # Walk up the chain while each parent becomes a leaf and is the best choice
            # left (the common case: a dead chain peeled from its tail); a parent that is
            # not the best yet waits in the heap.
            # (A parent met here was not a leaf when the call began, so it is in no
            # candidate list, and it reaches zero children only once: no ``seen`` check.)
            p = par[s]
            if not leaves_only or p < 0:
                continue
            # Neither the next candidate nor the heap changes while a chain is peeled: the
            # key a parent must not exceed to go at once is fixed for the whole climb.
            bound = key_l[i] if i < n else _NO_BOUND
            if heap and heap[0][0] < bound:
                bound = heap[0][0]
            while not dead[p]:
                # A parent with one child is met once (its child goes once): no count to keep.
                if kids[p] != 1:
                    left = kids_left[p] = kids_left.get(p, kids[p]) - 1
                    if left:
                        break
                t = tl[p]
                a = now - t
                pk = rank[cl[p] + (lut[a] if a < lut_n else _age_bin_capped(a, nb))] + t
                if pk <= bound and len(out) < count:
                    key = keys[p]
                    if key not in taken and evictable(key):
                        out.append(key)
                        p = par[p]
                        if p < 0:
                            break
                        continue
                    break
                heapq.heappush(heap, (pk, p))
                break
        return out
