"""Compiled per-batch kernels of the ``lhd`` eviction policy (:class:`kvpool.master.eviction.HitDensityPolicy`).

The policy keeps its per-block state in numpy arrays indexed by *slot* (one per resident
block, or per removed block that still has resident children) and hands each call of the
index (one put's inserts, one lease's accesses, one eviction's removals, one selection) to
one of these functions, compiled by numba: the per-block loop runs as machine code, and
Python does only the work on ``bytes`` keys (dict lookups by ``map``, in C) around one call.

State layout (``st``, int64, one row per slot, one column per field: a slot's fields share
a cache line or two, which is what the per-block work reads):

* ``TICK``: tick of the block's last reference; ``CLS``: its class times ``BINS`` (the first
  cell of its row in the rank table);
* ``KIDS``: resident children; ``PAR``: parent slot or -1; ``DEAD``: 1 when the block was
  removed while it still had children (the slot is freed by its last child's removal);
* ``LPOS``: index in ``leaves`` or -1; ``RES``: 1 while a key is resident in the slot;
* ``BLOCKED``, ``TAKEN``, ``SEEN``, ``KLEFT``: scratch of one selection (a key the index
  refused, a key chosen already, a candidate met in this walk, children left of a parent
  this walk peels), back to 0 (``KLEFT``: -1) when the call returns.

``meta`` holds the scalars: ``NOW`` (ticks so far), ``NLEAVES``, ``NFREE``, ``NSLOTS`` (slots
ever used: the high-water mark) and ``NPENDING`` (reuses counted in ``pending`` since the
last fold). ``leaves`` lists the leaf slots in no order (swap-remove); ``free`` is a stack of
free slots. The caller grows the arrays before a call that may need more slots.

Each function does exactly what the policy's docstring states, in the same order as the
Python implementation it replaced (``tests/unit/master/lhd_reference.py`` is that one,
kept as the test oracle): same slots, same leaf order, same victims.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["FIELDS", "TICK", "CLS", "KIDS", "PAR", "DEAD", "LPOS", "RES", "BLOCKED", "TAKEN", "SEEN",
           "KLEFT", "NOW", "NLEAVES", "NFREE", "NSLOTS", "NPENDING", "insert", "access", "remove",
           "choose", "warm_up"]

TICK, CLS, KIDS, PAR, DEAD, LPOS, RES, BLOCKED, TAKEN, SEEN, KLEFT = range(11)
FIELDS = 11
NOW, NLEAVES, NFREE, NSLOTS, NPENDING = range(5)

#: A sort key above every real one (rank << 40 plus a tick below 2**40).
_NO_BOUND = np.int64((1 << 63) - 1)


@njit(cache=True, nogil=True)
def age_bin(age, lut, nb):
    """Quarter-octave bin of an age, capped at ``nb - 1``: from ``lut`` below its length,
    else 0..3 exactly, then 4 bins per doubling."""
    if age < lut.shape[0]:
        return np.int64(lut[age])
    e = -1
    x = age
    while x:
        x >>= 1
        e += 1
    if e < 2:
        return age if age > 0 else 0
    b = 4 * e + ((age >> (e - 2)) & 3) - 4
    return b if b < nb else nb - 1


@njit(cache=True, nogil=True)
def _unleaf(st, leaves, meta, p):
    """Take slot ``p`` out of the leaf list (swap-remove: the last leaf takes its place)."""
    i = st[p, LPOS]
    if i < 0:
        return
    nl = meta[NLEAVES] - 1
    meta[NLEAVES] = nl
    moved = leaves[nl]
    if moved != p:
        leaves[i] = moved
        st[moved, LPOS] = i
    st[p, LPOS] = -1


@njit(cache=True, nogil=True)
def _leaf(st, leaves, meta, s):
    nl = meta[NLEAVES]
    st[s, LPOS] = nl
    leaves[nl] = s
    meta[NLEAVES] = nl + 1


@njit(cache=True, nogil=True)
def insert(st, leaves, free, meta, pending, row, lut, nb, olds, lasts, parents, chain, slots, values):
    """References of ``m`` keys not resident (one insert batch), in order.

    ``olds[i]``: the key's history value (``tick << 9 | count << 1 | last``) or 0 if it has
    none; ``lasts[i]``: its ``BlockInfo.last``. ``parents[i]``: the parent's slot if it is
    resident, -1 if none or unknown, ``-2 - j`` for the ``j``-th key of this batch; with
    ``chain`` every key but the first has the one before it as parent (``parents[0]`` is
    the head's). Writes each key's slot to ``slots`` and its new history value to ``values``;
    counts the reuses that end (one per key with history) in ``pending``. A resident parent
    that gains a child stops being a leaf; every new block without children is a leaf.
    """
    m = olds.shape[0]
    now = meta[NOW]
    nf = meta[NFREE]
    ns = meta[NSLOTS]
    npend = meta[NPENDING]
    unleaf = np.empty(m, np.int64)
    nu = 0
    for i in range(m):
        now += 1
        old = olds[i]
        last = lasts[i]
        if old != 0:
            count = (old >> 1) & 0xFF
            last = old & 1
            pending[row[count] + last * nb + age_bin(now - (old >> 9), lut, nb)] += 1
            npend += 1
            if count < 255:
                count += 1
        else:
            count = 1
        values[i] = (now << 9) | (count << 1) | last
        if nf > 0:  # a free slot has no children and is not dead (see remove)
            nf -= 1
            s = free[nf]
        else:
            s = ns
            ns += 1
            st[s, KIDS] = 0
            st[s, PAR] = -1
            st[s, DEAD] = 0
            st[s, LPOS] = -1
        st[s, TICK] = now
        st[s, CLS] = row[count] + last * nb
        st[s, RES] = 1
        slots[i] = s
        ps = parents[i] if (i == 0 or not chain) else -1 - i
        if ps == -1:
            p = -1
        elif ps <= -2:  # a block of this batch: new, so not a leaf yet
            p = slots[-2 - ps]
            st[p, KIDS] += 1
        else:
            p = ps
            st[p, KIDS] += 1
            if st[p, LPOS] >= 0:
                unleaf[nu] = p
                nu += 1
        st[s, PAR] = p
    for j in range(nu):
        _unleaf(st, leaves, meta, unleaf[j])
    for i in range(m):
        s = slots[i]
        if st[s, KIDS] == 0:
            _leaf(st, leaves, meta, s)
    meta[NOW] = now
    meta[NFREE] = nf
    meta[NSLOTS] = ns
    meta[NPENDING] = npend


@njit(cache=True, nogil=True)
def access(st, meta, pending, row, lut, nb, slots, olds, values):
    """References of resident keys (one access batch, each key once), in order: the slot's
    tick and class move; a key with history ends a reuse interval (counted in ``pending``),
    one without (trimmed) starts again at count 1, not last."""
    now = meta[NOW]
    npend = meta[NPENDING]
    c1 = row[1]
    for i in range(slots.shape[0]):
        s = slots[i]
        now += 1
        old = olds[i]
        if old != 0:
            count = (old >> 1) & 0xFF
            last = old & 1
            pending[row[count] + last * nb + age_bin(now - (old >> 9), lut, nb)] += 1
            npend += 1
            if count < 255:
                count += 1
            values[i] = (now << 9) | (count << 1) | last
            st[s, CLS] = row[count] + last * nb
        else:
            values[i] = (now << 9) | 2
            st[s, CLS] = c1
        st[s, TICK] = now
    meta[NOW] = now
    meta[NPENDING] = npend


@njit(cache=True, nogil=True)
def remove(st, leaves, free, meta, slots):
    """Removals in order (-1: a key that was not resident). A leaf leaves the leaf list; a
    parent left with no children becomes a leaf, or is freed if it was removed already
    (dead); a block removed while it has children stays as a dead slot for them."""
    nf = meta[NFREE]
    for j in range(slots.shape[0]):
        s = slots[j]
        if s < 0:
            continue
        st[s, RES] = 0
        _unleaf(st, leaves, meta, s)
        p = st[s, PAR]
        if p >= 0:
            left = st[p, KIDS] - 1
            st[p, KIDS] = left
            if left == 0:
                if st[p, DEAD]:
                    st[p, DEAD] = 0
                    free[nf] = p
                    nf += 1
                else:
                    _leaf(st, leaves, meta, p)
        if st[s, KIDS]:
            st[s, DEAD] = 1
        else:
            free[nf] = s
            nf += 1
    meta[NFREE] = nf


@njit(cache=True, nogil=True)
def _sort_key(st, rank40, lut, nb, now, s):
    """Victims first: density rank, then older first (``rank << 40`` plus the last tick)."""
    t = st[s, TICK]
    return rank40[st[s, CLS] + age_bin(now - t, lut, nb)] + t


@njit(cache=True, nogil=True)
def _smallest(keys, k):
    """Positions of the ``k`` smallest keys, in ascending key order (equal keys in input
    order): the head of a stable sort, by insertion into a sorted buffer of ``k``."""
    n = keys.shape[0]
    if k > n:
        k = n
    top = np.empty(k, np.int64)
    tk = np.empty(k, np.int64)
    c = 0
    for i in range(n):
        x = keys[i]
        if c == k:
            if x >= tk[k - 1]:
                continue
            j = k - 1
        else:
            j = c
            c += 1
        while j > 0 and tk[j - 1] > x:
            tk[j] = tk[j - 1]
            top[j] = top[j - 1]
            j -= 1
        tk[j] = x
        top[j] = i
    return top


@njit(cache=True, nogil=True)
def _heap_push(hk, hv, n, key, val):
    """Push onto the binary min-heap of ``n`` (key, value) pairs in ``hk``/``hv``."""
    i = n
    while i > 0:
        up = (i - 1) >> 1
        if hk[up] < key or (hk[up] == key and hv[up] <= val):
            break
        hk[i] = hk[up]
        hv[i] = hv[up]
        i = up
    hk[i] = key
    hv[i] = val
    return n + 1


@njit(cache=True, nogil=True)
def _heap_pop(hk, hv, n):
    """Remove the smallest pair (the caller read it at index 0); returns the new size."""
    n -= 1
    key = hk[n]
    val = hv[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and (hk[c + 1] < hk[c] or (hk[c + 1] == hk[c] and hv[c + 1] < hv[c])):
            c += 1
        if key < hk[c] or (key == hk[c] and val <= hv[c]):
            break
        hk[i] = hk[c]
        hv[i] = hv[c]
        i = c
    hk[i] = key
    hv[i] = val
    return n


@njit(cache=True, nogil=True)
def _walk(st, rank40, lut, nb, now, cand, ckey, count, leaves_only, out, nout):
    """Take up to ``count`` victims (appended to ``out`` from ``nout``) from candidates sorted
    by key, skipping keys blocked or taken; a victim's parent that becomes a leaf competes at
    once. Returns the new length of ``out``."""
    n = cand.shape[0]
    hk = np.empty(count + 1, np.int64)  # parents waiting: each victim adds at most one
    hv = np.empty(count + 1, np.int64)
    nh = 0
    touched = np.empty(n + 2 * count + 1, np.int64)
    nt = 0
    i = 0
    got = 0
    while got < count:
        if nh > 0 and (i >= n or hk[0] < ckey[i]):
            s = hv[0]
            nh = _heap_pop(hk, hv, nh)
        elif i < n:
            s = cand[i]
            i += 1
        else:
            break
        if st[s, SEEN]:
            continue
        st[s, SEEN] = 1
        touched[nt] = s
        nt += 1
        if st[s, TAKEN] or st[s, BLOCKED]:
            continue
        out[nout + got] = s
        got += 1
        # Walk up the chain while each parent becomes a leaf and is the best choice left
        # (a dead chain peeled from its tail); a parent that is not the best yet waits in
        # the heap. A parent met here was in no candidate list (it was not a leaf) and
        # reaches zero children once: it needs no SEEN mark.
        p = st[s, PAR]
        if not leaves_only or p < 0:
            continue
        bound = ckey[i] if i < n else _NO_BOUND
        if nh > 0 and hk[0] < bound:
            bound = hk[0]
        while not st[p, DEAD]:
            kids = st[p, KIDS]
            if kids != 1:  # a parent with one child is met once: no count to keep
                left = st[p, KLEFT]
                if left < 0:
                    left = kids
                    touched[nt] = p
                    nt += 1
                left -= 1
                st[p, KLEFT] = left
                if left:
                    break
            pk = _sort_key(st, rank40, lut, nb, now, p)
            if pk <= bound and got < count:
                if not st[p, TAKEN] and not st[p, BLOCKED]:
                    out[nout + got] = p
                    got += 1
                    p = st[p, PAR]
                    if p < 0:
                        break
                    continue
                break
            nh = _heap_push(hk, hv, nh, pk, p)
            break
    for j in range(nt):
        s = touched[j]
        st[s, SEEN] = 0
        st[s, KLEFT] = -1
    return nout + got


@njit(cache=True, nogil=True)
def _pick(st, rank40, lut, nb, now, cand, count, leaves_only, out, nout):
    """Up to ``count`` victims from ``cand``, best first, appended to ``out``: the walk looks
    at the best ``2 * count + 16`` candidates, and four times further each time too many of
    them were blocked or taken."""
    n = cand.shape[0]
    if n == 0:
        return nout
    keys = np.empty(n, np.int64)
    for j in range(n):
        keys[j] = _sort_key(st, rank40, lut, nb, now, cand[j])
    k = min(n, 2 * count + 16)
    while True:
        top = _smallest(keys, k)
        got = _walk(st, rank40, lut, nb, now, cand[top], keys[top], count, leaves_only, out, nout)
        if got - nout >= count or k >= n:
            return got
        k = min(n, 4 * k)


@njit(cache=True, nogil=True)
def choose(st, leaves, meta, rank40, lut, nb, cand, sampled, count, out):
    """One selection: up to ``count`` victim slots into ``out``, best first; returns how many.

    ``cand`` are the candidates (sampled leaves when ``sampled``, else every leaf). If the
    sample runs short (blocked leaves), every leaf; if no leaf is left, interior blocks, as a
    last resort. Keys the index refused are marked ``BLOCKED`` by the caller, which calls
    again until every victim returned was accepted."""
    now = meta[NOW]
    nout = _pick(st, rank40, lut, nb, now, cand, count, True, out, 0)
    if nout < count and sampled:
        for j in range(nout):
            st[out[j], TAKEN] = 1
        nout = _pick(st, rank40, lut, nb, now, leaves[:meta[NLEAVES]], count - nout, True, out, nout)
    if nout < count:
        for j in range(nout):
            st[out[j], TAKEN] = 1
        ns = meta[NSLOTS]
        rest = np.empty(ns, np.int64)
        nr = 0
        for s in range(ns):
            if st[s, RES] and not st[s, TAKEN]:
                rest[nr] = s
                nr += 1
        nout = _pick(st, rank40, lut, nb, now, rest[:nr], count - nout, False, out, nout)
    for j in range(nout):
        st[out[j], TAKEN] = 0
    return nout


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel on a tiny state, so that a master
    pays it at startup and not in its first eviction."""
    nb = 4
    st = np.zeros((8, FIELDS), np.int64)
    st[:, KLEFT] = -1
    leaves = np.zeros(8, np.int64)
    free = np.zeros(8, np.int64)
    meta = np.zeros(5, np.int64)
    pending = np.zeros(2 * nb, np.int64)
    row = np.zeros(256, np.int64)
    lut = np.zeros(4, np.int8)
    rank40 = np.zeros(2 * nb, np.int64)
    one = np.zeros(1, np.int64)
    slots = np.zeros(2, np.int64)
    values = np.zeros(2, np.int64)
    insert(st, leaves, free, meta, pending, row, lut, nb, np.zeros(2, np.int64), np.zeros(2, np.int64),
           np.array([-1, -2], np.int64), True, slots, values)
    access(st, meta, pending, row, lut, nb, slots[:1], one, values[:1])
    out = np.zeros(2, np.int64)
    choose(st, leaves, meta, rank40, lut, nb, leaves[:meta[NLEAVES]], False, 2, out)
    remove(st, leaves, free, meta, slots)
