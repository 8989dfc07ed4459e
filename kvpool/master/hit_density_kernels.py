"""Compiled per-batch kernels of the ``lhd`` eviction policy (:class:`kvpool.master.eviction.HitDensityPolicy`).

The policy gives every key it knows (resident in the tier, or only remembered in its
reference history) a dense integer *id*, and keeps everything about it in numpy arrays
indexed by id. Each call of the index (one put's inserts, one lease's accesses, one
eviction's removals, one selection) is one call of these functions, compiled by numba: the
per-block loop, key lookups included, runs as machine code, and so do the random draws of
a selection and the bins of ages (from the position of the top bit). Python only joins the
batch's keys into one buffer, and reads the victims' keys back from their words.

Keys reach the kernels as two int64 *words* each, in a bytes object (``kw``, 16 bytes a
key, read as little-endian words: key ``i`` is words ``2i`` and ``2i + 1``; a bytes object
passes into a kernel at a fraction of an array's cost): a 16-byte key (the pool's block
key) is its own bytes; any other key is its
128-bit xxh3 digest (:func:`kvpool.master.eviction.key_words`). ``tab`` maps words to ids:
open addressing with linear probing over a power-of-two int32 array of ``id + 1`` (0: empty;
ids stay below 2**31, a history capped far lower), at most half full,
deletions by backward shift (no tombstones, so a probe ends at the first empty cell). The
hash is a multiply-xorshift of both words, since the words of a replayed trace are small
integers, not random bits.

State layout (``st``, int64, one row per id, one column per field: an id's fields are one
64-byte cache line, which is what the per-block work reads; the policy aligns the array):

* ``HVAL``: the key's history entry, ``tick << 9 | count << 1 | last`` (last reference tick,
  references so far capped at 255, last-block flag), 0 when it is not in the history;
* ``TICK``: tick of the block's last reference while resident (it outlives a trimmed
  history entry); ``CLS``: its class times ``BINS`` (the first cell of its rank-table row);
* ``KIDS``: resident children; ``PAR``: parent id or -1; ``LPOS``: index in ``leaves`` or -1;
* ``FLAGS``: ``F_RES`` while the key is resident; ``F_DEAD`` when the block was removed
  while it still had children: the id stays, keyless, for their parent links, and is freed
  by its last child's removal (the key, if it is remembered, moves to a new id);
  ``F_BLOCKED``, ``F_TAKEN``, ``F_SEEN``: scratch of one selection (a key the index refused,
  a key chosen already, a candidate met in this walk), clear when the call returns;
* ``KLEFT``: scratch of one walk, children left of a parent it peels (-1 outside).

``words`` (int64, two per id) holds the key's words while the id has a key: for a 16-byte
key, its bytes, from which the caller reads a victim's key back. They are apart from the
rows because only the table's probes read them, and a probe that ends at an empty cell (a
new key) reads none.

An id has a key, and is in ``tab``, while it is resident or remembered (``HVAL`` != 0); a
dead id is keyless. An id is in use while it has a key or is dead; otherwise it is on the
``free`` stack (the functions report which ids lost their key, for the caller's list). ``meta`` holds the scalars: ``NOW`` (ticks so far), ``NLEAVES``, ``NFREE``,
``NSLOTS`` (ids ever used: the high-water mark), ``NPENDING`` (reuses counted in ``pending``
since the last fold), ``NHIST`` (ids with a history entry) and ``NRES`` (resident ones).
``leaves`` lists the leaf ids in no order (swap-remove). The caller grows the arrays before
a call that may need more ids.

Each function does what the policy's docstring states, in the same order as the Python
implementation it replaced (``tests/unit/master/lhd_reference.py``, kept as the test
oracle): the same leaf order and the same victims.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import leading_zeros  # LLVM's ctlz
from numba.extending import intrinsic

__all__ = [
    "CLS", "FIELDS", "FLAGS", "F_BLOCKED", "F_DEAD", "F_RES", "F_SEEN", "F_TAKEN", "HVAL", "KIDS",
    "KLEFT", "LPOS", "META", "NFREE", "NHIST", "NLEAVES", "NOW", "NPENDING", "NRES", "NSLOTS", "PAR", "RNG", "RNG0", "TICK",
    "DUE", "NEED_ROOM", "access", "age_bin", "best_ratios", "choose", "find", "history_cells", "insert", "rehash", "remove", "trim", "warm_up",
]

TICK, CLS, KIDS, PAR, LPOS, FLAGS, KLEFT, HVAL = range(8)
FIELDS = 8  # 64 bytes: one cache line per id (the policy aligns the array to one)
#: Bits of ``FLAGS``.
F_RES, F_DEAD, F_BLOCKED, F_TAKEN, F_SEEN = 1, 2, 4, 8, 16
NOW, NLEAVES, NFREE, NSLOTS, NPENDING, NHIST, NRES, RNG, RNG0 = range(9)
META = 9
#: What a call that needs more room than the arrays have returns, having changed nothing.
NEED_ROOM = -2
#: Added to what ``insert`` and ``access`` return when the clock reached ``until``: the
#: caller refreshes the densities before it goes on (one int to test, not a read of ``meta``).
DUE = 1 << 40

#: A sort key above every real one (rank << 40 plus a tick below 2**40).
_NO_BOUND = np.int64((1 << 63) - 1)


@intrinsic
def _prefetch(typingctx, arr, i):
    """Hint that row ``i`` of ``arr`` (element ``i`` of a 1-d one) is read soon: LLVM's
    ``prefetch`` (read, keep in all cache levels), which never faults and changes nothing.
    A batch's lookups miss the caches (the index's own work between two calls evicts the
    state), and each probe's loads depend on the one before; hinting every key's cell
    first lets the misses of a whole batch overlap instead of queueing one after another."""
    sig = types.void(arr, i)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        index = [args[1]] + [zero] * (aryty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, index, wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _prefetch_keys(st, words, tab, kw, start, n):
    """Prefetch what looking up keys ``start`` to ``n`` of ``kw`` reads: each key's home
    cell, then (once those arrive) the words and row of the id found there."""
    mask = tab.shape[0] - 1
    for i in range(start, n):
        _prefetch(tab, _home(_word(kw, 2 * i), _word(kw, 2 * i + 1), mask))
    for i in range(start, n):
        v = tab[_home(_word(kw, 2 * i), _word(kw, 2 * i + 1), mask)]
        if v != 0:
            _prefetch(words, v - 1)
            _prefetch(st, v - 1)


@njit(cache=True, nogil=True)
def age_bin(age, nb):
    """Quarter-octave bin of an age, capped at ``nb - 1``: 0..3 exactly, then 4 bins per
    doubling (``kvpool.master.eviction._age_bin``, from the position of the top bit: a
    single instruction, where a table of bins would sit in the caches beside the state)."""
    if age < 4:
        return age if age > 0 else 0
    e = 63 - leading_zeros(age)
    b = 4 * e + ((age >> (e - 2)) & 3) - 4
    return b if b < nb else nb - 1


@njit(cache=True, nogil=True, inline="always")
def _word(kw, j):
    """Word ``j`` of the bytes ``kw`` (little-endian int64: how numpy reads the key's bytes)."""
    o = 8 * j
    return (np.int64(kw[o]) | np.int64(kw[o + 1]) << 8 | np.int64(kw[o + 2]) << 16 | np.int64(kw[o + 3]) << 24
            | np.int64(kw[o + 4]) << 32 | np.int64(kw[o + 5]) << 40 | np.int64(kw[o + 6]) << 48
            | np.int64(kw[o + 7]) << 56)


@njit(cache=True, nogil=True)
def _home(k0, k1, mask):
    """The table cell a key's probe starts at."""
    h = (k0 ^ (k1 * np.int64(-4658895280553007687))) * np.int64(-7046029254386353131)
    return (h ^ ((h >> 29) & np.int64(0x7FFFFFFFF))) & mask


@njit(cache=True, nogil=True)
def _find(words, tab, k0, k1):
    """The id of a key's words, or -1."""
    mask = tab.shape[0] - 1
    i = _home(k0, k1, mask)
    while True:
        v = tab[i]
        if v == 0:
            return -1
        if words[v - 1, 0] == k0 and words[v - 1, 1] == k1:
            return v - 1
        i = (i + 1) & mask


@njit(cache=True, nogil=True)
def _tab_add(words, tab, s):
    """Enter id ``s`` under its words (they are in no other entry)."""
    mask = tab.shape[0] - 1
    i = _home(words[s, 0], words[s, 1], mask)
    while tab[i] != 0:
        i = (i + 1) & mask
    tab[i] = s + 1


@njit(cache=True, nogil=True)
def _tab_cell(words, tab, s):
    """The cell that holds id ``s`` (which is in the table)."""
    mask = tab.shape[0] - 1
    i = _home(words[s, 0], words[s, 1], mask)
    while tab[i] != s + 1:
        i = (i + 1) & mask
    return i


@njit(cache=True, nogil=True)
def _tab_del(words, tab, s):
    """Take id ``s`` out of the table: later entries of its probe run shift back into the
    hole, so that every probe still ends at the first empty cell."""
    mask = tab.shape[0] - 1
    i = _tab_cell(words, tab, s)
    j = i
    while True:
        j = (j + 1) & mask
        v = tab[j]
        if v == 0:
            break
        h = _home(words[v - 1, 0], words[v - 1, 1], mask)
        # The entry at j may move to i unless its home lies cyclically in (i, j].
        if (i <= j and (h <= i or h > j)) or (i > j and h <= i and h > j):
            tab[i] = v
            i = j
    tab[i] = 0


@njit(cache=True, nogil=True)
def find(words, tab, kw, ids):
    """``ids[i]``: the id of key ``i`` of ``kw``, or -1."""
    for i in range(len(kw) // 16):
        ids[i] = _find(words, tab, _word(kw, 2 * i), _word(kw, 2 * i + 1))


@njit(cache=True, nogil=True)
def rehash(st, words, tab, meta):
    """Enter every id that has a key into an empty ``tab`` (after it grew)."""
    for s in range(meta[NSLOTS]):
        if (st[s, FLAGS] & F_RES) or st[s, HVAL] != 0:
            _tab_add(words, tab, s)


@njit(cache=True, nogil=True)
def _unleaf(st, leaves, meta, p):
    """Take slot ``p`` out of the leaf list (swap-remove: the last leaf takes its place)."""
    i = st[p, LPOS]
    if i < 0:
        return
    nl = meta[NLEAVES] - 1
    meta[NLEAVES] = nl
    moved = leaves[nl, 0]
    if moved != p:
        leaves[i, 0] = moved
        leaves[i, 1] = leaves[nl, 1]
        st[moved, LPOS] = i
    st[p, LPOS] = -1


@njit(cache=True, nogil=True)
def _leaf(st, leaves, meta, s):
    nl = meta[NLEAVES]
    st[s, LPOS] = nl
    leaves[nl, 0] = s
    leaves[nl, 1] = (st[s, CLS] << 40) | st[s, TICK]
    meta[NLEAVES] = nl + 1


@njit(cache=True, nogil=True)
def _new_id(st, free, meta):
    """A fresh id: the last freed one, or the next never used."""
    nf = meta[NFREE]
    if nf > 0:
        nf -= 1
        meta[NFREE] = nf
        s = free[nf]
    else:
        s = meta[NSLOTS]
        meta[NSLOTS] = s + 1
    st[s, KIDS] = 0
    st[s, PAR] = -1
    st[s, LPOS] = -1
    st[s, FLAGS] = 0
    st[s, KLEFT] = -1  # (a row never used is all zeros: arrays are grown without a fill)
    st[s, HVAL] = 0
    return s


@njit(cache=True, nogil=True)
def _room(st, leaves, meta, ids, res):
    """Whether ``ids`` more ids, and ``res`` more resident blocks (leaves), fit the arrays."""
    return (meta[NFREE] + st.shape[0] - meta[NSLOTS] >= ids) and (leaves.shape[0] - meta[NRES] >= res)


@njit(cache=True, nogil=True)
def _free_id(free, meta, s):
    nf = meta[NFREE]
    free[nf] = s
    meta[NFREE] = nf + 1


@njit(cache=True, nogil=True)
def _reference(st, pending, row, nb, s, now, last):
    """One reference of id ``s`` at tick ``now``: a remembered key ends a reuse interval
    (counted in ``pending`` by the class and age bin it ends in) and counts one more
    reference; a key without history starts at count 1 with ``last``. Sets its history
    entry, tick and class."""
    old = st[s, HVAL]
    if old != 0:
        count = (old >> 1) & 0xFF
        last = old & 1
        pending[row[count] + last * nb + age_bin(now - (old >> 9), nb)] += 1
        if count < 255:
            count += 1
    else:
        count = 1
    st[s, HVAL] = (now << 9) | (count << 1) | last
    st[s, TICK] = now
    st[s, CLS] = row[count] + last * nb
    return old != 0


@njit(cache=True, nogil=True)
def _repeats(kw, m):
    """Whether one of the first ``m`` keys of ``kw`` is listed twice (a small table of
    positions, at most half full)."""
    mask = 1
    while mask < 2 * m:
        mask <<= 1
    seen = np.zeros(mask, np.int32)
    mask -= 1
    for i in range(m):
        k0 = _word(kw, 2 * i)
        k1 = _word(kw, 2 * i + 1)
        c = _home(k0, k1, mask)
        while seen[c] != 0:
            j = seen[c] - 1
            if _word(kw, 2 * j) == k0 and _word(kw, 2 * j + 1) == k1:
                return True
            c = (c + 1) & mask
        seen[c] = i + 1
    return False


@njit(cache=True, nogil=True)
def insert(st, words, tab, leaves, free, meta, pending, row, nb, kw, lasts, chain, start, until, ids, dead):
    """References of ``m`` keys that become resident (one insert batch), in order.

    ``kw`` holds the ``m`` keys' words, then their parents': each key's parent, or with
    ``chain`` only the first's, since every other key has the one before it as parent.
    Words ``-1, -1`` stand for no parent. ``lasts[i]`` (bytes): the key's ``BlockInfo.last``.
    A parent counts only while resident (a key of this batch before this one, or a block
    already resident); a resident parent that gains a child stops being a leaf; every new
    block without children is a leaf. A key that is not known gets a new id. ``ids``
    receives each key's id.

    Keys from ``start`` on are inserted while the clock is below ``until`` (a density
    refresh is due there). Returns the index to go on from, plus :data:`DUE` if the clock
    reached ``until``: the caller refreshes, then calls again from it, and the rest is inserted as a batch of its own (the key before its first
    is its first's parent), which is what inserting the two parts one after the other does.
    ``dead`` (with ``start`` 0; else empty) are ids of victims the caller was told to
    remove and has not yet: they are removed first, as by :func:`remove` (whose ``moved``
    pairs the caller does not need then), which saves the caller a call per eviction.

    With ``start`` 0 it returns :data:`NEED_ROOM`, having changed nothing, if the arrays may
    not hold the removals and the batch; then, after the removals, -1 if a key is resident
    already or listed twice (the caller then inserts one key at a time, removing it first).
    """
    m = len(lasts)
    if start == 0:
        nd = dead.shape[0]
        if not _room(st, leaves, meta, m + nd, m):
            return NEED_ROOM
        if nd:
            _remove(st, words, tab, leaves, free, meta, kw, dead, np.empty(2 * nd, np.int64))
        _prefetch_keys(st, words, tab, kw, 0, m)
        if _repeats(kw, m):
            return -1
        for i in range(m):
            s = _find(words, tab, _word(kw, 2 * i), _word(kw, 2 * i + 1))
            if s >= 0 and (st[s, FLAGS] & F_RES):
                return -1
            ids[i] = s
    else:  # a refresh since the last call may have forgotten some of the rest
        for i in range(start, m):
            ids[i] = _find(words, tab, _word(kw, 2 * i), _word(kw, 2 * i + 1))
    now = meta[NOW]
    npend = meta[NPENDING]
    nhist = meta[NHIST]
    unleaf = np.empty(m - start, np.int64)
    nu = 0
    end = start
    while end < m and now < until:
        i = end
        end += 1
        now += 1
        s = ids[i]
        if s < 0:
            s = _new_id(st, free, meta)
            words[s, 0] = _word(kw, 2 * i)
            words[s, 1] = _word(kw, 2 * i + 1)
            _tab_add(words, tab, s)
            ids[i] = s
        if _reference(st, pending, row, nb, s, now, lasts[i]):
            npend += 1
        else:
            nhist += 1
        st[s, FLAGS] |= F_RES
        if chain and i > start:
            p = ids[i - 1]  # new in this batch, so not a leaf yet
            st[p, KIDS] += 1
        else:
            p = -1
            if chain and i > 0:  # a later part of a chain: its parent was inserted already
                p = ids[i - 1]
            else:
                j = 2 * m if chain else 2 * (m + i)
                if _word(kw, j) != -1 or _word(kw, j + 1) != -1:
                    p = _find(words, tab, _word(kw, j), _word(kw, j + 1))
            if p >= 0 and (st[p, FLAGS] & F_RES) and p != s:  # (a block is not its own parent)
                st[p, KIDS] += 1
                if st[p, LPOS] >= 0:
                    unleaf[nu] = p
                    nu += 1
            else:  # none, unknown, or known only in the history: not a parent here
                p = -1
        st[s, PAR] = p
    for j in range(nu):
        _unleaf(st, leaves, meta, unleaf[j])
    for i in range(start, end):
        s = ids[i]
        if st[s, KIDS] == 0:
            _leaf(st, leaves, meta, s)
    meta[NOW] = now
    meta[NPENDING] = npend
    meta[NHIST] = nhist
    meta[NRES] += end - start
    return end + DUE if now >= until else end


@njit(cache=True, nogil=True)
def access(st, words, tab, leaves, meta, pending, row, nb, kw, start, until, ids):
    """References of the resident keys of ``kw`` from key ``start`` on (one access batch), in order,
    each key once however often it is listed, until the clock reaches ``until`` (a density
    refresh is due). Returns the index to go on from, plus :data:`DUE` if the clock reached
    ``until``; the caller refreshes and calls again from there. ``ids`` is scratch, one per key: the ids referenced carry ``F_SEEN`` across
    the calls of one batch, and the call that ends it clears them."""
    now = meta[NOW]
    npend = meta[NPENDING]
    nhist = meta[NHIST]
    n = len(kw) // 16
    _prefetch_keys(st, words, tab, kw, start, n)
    i = start
    while i < n and now < until:
        s = _find(words, tab, _word(kw, 2 * i), _word(kw, 2 * i + 1))
        if s < 0 or (st[s, FLAGS] & (F_RES | F_SEEN)) != F_RES:  # not resident, or met already
            ids[i] = -1
            i += 1
            continue
        ids[i] = s
        i += 1
        st[s, FLAGS] |= F_SEEN
        now += 1
        if _reference(st, pending, row, nb, s, now, 0):
            npend += 1
        else:  # trimmed from the history meanwhile: it starts again at count 1, not last
            nhist += 1
        if st[s, LPOS] >= 0:
            leaves[st[s, LPOS], 1] = (st[s, CLS] << 40) | now
    meta[NOW] = now
    meta[NPENDING] = npend
    meta[NHIST] = nhist
    if i == n:
        for j in range(n):
            if ids[j] >= 0:
                st[ids[j], FLAGS] &= ~F_SEEN
    return i + DUE if now >= until else i


@njit(cache=True, nogil=True)
def remove(st, words, tab, leaves, free, meta, kw, ids, moved):
    """Removals of keys ``kw`` in order, or when ``ids`` is not empty of those ids (the
    victims just chosen: no lookups); a key not resident: nothing. A leaf leaves the leaf
    list; a parent left with no children becomes a leaf, or is freed if it was removed
    already (dead); a block removed while it has children stays as a dead, keyless id for
    them.

    Writes ``(id, new id)`` pairs to ``moved`` for each id that lost its key: the new id
    carries the key (and its history), or is -1 when the key is forgotten (no history).
    Returns how many pairs, or :data:`NEED_ROOM`, having changed nothing, if the arrays may
    not hold a new id for each key."""
    n = ids.shape[0] if ids.shape[0] > 0 else len(kw) // 16
    if not _room(st, leaves, meta, n, 0):
        return NEED_ROOM
    return _remove(st, words, tab, leaves, free, meta, kw, ids, moved)


@njit(cache=True, nogil=True)
def _remove(st, words, tab, leaves, free, meta, kw, ids, moved):
    """:func:`remove`, once the room for it is checked."""
    n = ids.shape[0] if ids.shape[0] > 0 else len(kw) // 16
    nm = 0
    nres = meta[NRES]
    by_id = ids.shape[0] > 0
    for j in range(n):
        s = ids[j] if by_id else _find(words, tab, _word(kw, 2 * j), _word(kw, 2 * j + 1))
        if s < 0 or not (st[s, FLAGS] & F_RES):
            continue
        st[s, FLAGS] &= ~F_RES
        nres -= 1
        _unleaf(st, leaves, meta, s)
        p = st[s, PAR]
        if p >= 0:
            left = st[p, KIDS] - 1
            st[p, KIDS] = left
            if left == 0:
                if st[p, FLAGS] & F_DEAD:
                    st[p, FLAGS] &= ~F_DEAD
                    _free_id(free, meta, p)
                else:
                    _leaf(st, leaves, meta, p)
        if st[s, KIDS]:
            st[s, FLAGS] |= F_DEAD
            n2 = -1
            if st[s, HVAL] != 0:  # the key and its history move to an id of their own
                n2 = _new_id(st, free, meta)
                st[n2, HVAL] = st[s, HVAL]
                st[n2, TICK] = st[s, TICK]
                words[n2, 0] = words[s, 0]
                words[n2, 1] = words[s, 1]
                tab[_tab_cell(words, tab, s)] = n2 + 1
                st[s, HVAL] = 0
            else:
                _tab_del(words, tab, s)
            moved[2 * nm] = s
            moved[2 * nm + 1] = n2
            nm += 1
        elif st[s, HVAL] == 0:  # neither resident nor remembered: forgotten
            _tab_del(words, tab, s)
            _free_id(free, meta, s)
            moved[2 * nm] = s
            moved[2 * nm + 1] = -1
            nm += 1
    meta[NRES] = nres
    return nm


@njit(cache=True, nogil=True)
def history_cells(st, meta, bucket, nb, cells):
    """Add to ``cells`` (one per class and age bin, flat) every history entry, by the class
    of its open interval (``bucket[count] + last``) and its age's bin; returns how many."""
    now = meta[NOW]
    n = 0
    for s in range(meta[NSLOTS]):
        v = st[s, HVAL]
        if v != 0:
            cells[(bucket[(v >> 1) & 0xFF] + (v & 1)) * nb + age_bin(now - (v >> 9), nb)] += 1
            n += 1
    return n


@njit(cache=True, nogil=True)
def best_ratios(surv, spacetime, top, density):
    """``density[c, i]`` for ``i < top``: the best ``(surv[c, i] - surv[c, T]) /
    (spacetime[c, T] - spacetime[c, i])`` over ``T`` in ``(i, top]``, and 0 if none is
    positive: the hits per unit of space-time of keeping a block from age bin ``i`` to
    ``T``, at its best horizon. The same subtractions and division, in the same IEEE
    arithmetic, as the numpy broadcast it replaced (``tests/unit/master/lhd_reference.py``
    keeps it), so the densities are equal to the last bit: O(bins^2) per class without the
    ``classes x bins x bins`` temporaries, a few milliseconds per refresh when the history
    spans many age bins. ``spacetime`` grows strictly (every survival is positive), so no
    division is by zero."""
    for c in range(surv.shape[0]):
        for i in range(top):
            best = 0.0
            si = surv[c, i]
            ci = spacetime[c, i]
            for t in range(i + 1, top + 1):
                r = (si - surv[c, t]) / (spacetime[c, t] - ci)
                if r > best:
                    best = r
            density[c, i] = best


@njit(cache=True, nogil=True)
def trim(st, words, tab, free, meta, drop, forgotten):
    """Take the ids in ``drop`` out of the history; those neither resident nor dead are
    freed and written to ``forgotten`` (their keys leave the table). Returns how many."""
    nf = 0
    for j in range(drop.shape[0]):
        s = drop[j]
        st[s, HVAL] = 0
        if not st[s, FLAGS] & (F_RES | F_DEAD):
            _tab_del(words, tab, s)
            _free_id(free, meta, s)
            forgotten[nf] = s
            nf += 1
    meta[NHIST] -= drop.shape[0]
    return nf


@njit(cache=True, nogil=True)
def _sort_key(st, rank40, nb, now, s):
    """Victims first: density rank, then older first (``rank << 40`` plus the last tick)."""
    t = st[s, TICK]
    return rank40[st[s, CLS] + age_bin(now - t, nb)] + t


@njit(cache=True, nogil=True)
def _packed_key(rank40, nb, now, packed):
    """``_sort_key`` of a leaf from its copy in the leaf list (``cls << 40 | tick``)."""
    t = packed & 0xFFFFFFFFFF
    return rank40[(packed >> 40) + age_bin(now - t, nb)] + t


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
def _walk(st, rank40, nb, now, cand, ckey, count, leaves_only, out, nout):
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
        if st[s, FLAGS] & F_SEEN:
            continue
        st[s, FLAGS] |= F_SEEN
        touched[nt] = s
        nt += 1
        if st[s, FLAGS] & (F_TAKEN | F_BLOCKED):
            continue
        out[nout + got] = s
        got += 1
        # Walk up the chain while each parent becomes a leaf and is the best choice left
        # (a dead chain peeled from its tail); a parent that is not the best yet waits in
        # the heap. A parent met here was in no candidate list (it was not a leaf) and
        # reaches zero children once: it needs no ``F_SEEN`` mark.
        p = st[s, PAR]
        if not leaves_only or p < 0:
            continue
        bound = ckey[i] if i < n else _NO_BOUND
        if nh > 0 and hk[0] < bound:
            bound = hk[0]
        while not (st[p, FLAGS] & F_DEAD):
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
            pk = _sort_key(st, rank40, nb, now, p)
            if pk <= bound and got < count:
                if not st[p, FLAGS] & (F_TAKEN | F_BLOCKED):
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
        st[s, FLAGS] &= ~F_SEEN
        st[s, KLEFT] = -1
    return nout + got


@njit(cache=True, nogil=True)
def _pick(st, rank40, nb, now, cand, keys, count, leaves_only, out, nout):
    """Up to ``count`` victims from ``cand`` (sort keys ``keys``), best first, appended to
    ``out``: the walk looks at the best ``2 * count + 16`` candidates, and four times further
    each time too many of them were blocked or taken."""
    n = cand.shape[0]
    if n == 0:
        return nout
    k = min(n, 2 * count + 16)
    while True:
        top = _smallest(keys, k)
        for j in range(top.shape[0]):  # the walk reads these rows in turn: let them arrive together
            _prefetch(st, cand[top[j]])
        got = _walk(st, rank40, nb, now, cand[top], keys[top], count, leaves_only, out, nout)
        if got - nout >= count or k >= n:
            return got
        k = min(n, 4 * k)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, nogil=True)
def _splitmix(x):
    """SplitMix64's output for state ``x`` (the state advances by ``_GOLDEN`` per draw)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def choose(st, leaves, meta, rank40, nb, samples, count, out):
    """One selection: up to ``count`` victim ids into ``out``, best first; returns how many.

    The candidates are ``samples * count`` leaves drawn at random (positions from SplitMix64,
    its state in ``meta[RNG]``: ``(draw >> 32) * leaves >> 32``), or every leaf when there
    are at most ``2 * count + 16`` or ``samples * count`` or fewer; they are scored from the
    leaf list's own copy of their class and tick (a small array, where the ids' rows are
    spread over the whole state). If the sample runs short (blocked leaves), every leaf; if
    no leaf is left, interior blocks, as a last resort. Keys the index refused are marked
    ``F_BLOCKED`` by the caller, which calls again until every victim returned was accepted;
    it first puts back the random state the call started from (kept in ``meta[RNG0]``), so
    that the walk made again draws the same sample."""
    now = meta[NOW]
    nl = meta[NLEAVES]
    meta[RNG0] = meta[RNG]
    nd = samples * count if nl > 2 * count + 16 and samples * count < nl else 0
    if nd > 0:
        cand = np.empty(nd, np.int64)
        keys = np.empty(nd, np.int64)
        state = np.uint64(meta[RNG])
        nlu = np.uint64(nl)
        for j in range(nd):
            state += _GOLDEN
            pos = np.int64(((_splitmix(state) >> np.uint64(32)) * nlu) >> np.uint64(32))
            cand[j] = leaves[pos, 0]
            keys[j] = _packed_key(rank40, nb, now, leaves[pos, 1])
        meta[RNG] = np.int64(state)
        nout = _pick(st, rank40, nb, now, cand, keys, count, True, out, 0)
    else:
        nout = 0
    if nout < count and (nd > 0 or nout == 0):  # the sample ran short, or there was none: every leaf
        for j in range(nout):
            st[out[j], FLAGS] |= F_TAKEN
        cand = leaves[:nl, 0].copy()
        keys = np.empty(nl, np.int64)
        for j in range(nl):
            keys[j] = _packed_key(rank40, nb, now, leaves[j, 1])
        nout = _pick(st, rank40, nb, now, cand, keys, count - nout, True, out, nout)
    if nout < count:
        for j in range(nout):
            st[out[j], FLAGS] |= F_TAKEN
        ns = meta[NSLOTS]
        rest = np.empty(ns, np.int64)
        nr = 0
        for s in range(ns):
            if st[s, FLAGS] & (F_RES | F_TAKEN) == F_RES:
                rest[nr] = s
                nr += 1
        rest = rest[:nr]
        keys = np.empty(nr, np.int64)
        for j in range(nr):
            keys[j] = _sort_key(st, rank40, nb, now, rest[j])
        nout = _pick(st, rank40, nb, now, rest, keys, count - nout, False, out, nout)
    for j in range(nout):
        st[out[j], FLAGS] &= ~F_TAKEN
    return nout


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel on a tiny state, so that a master
    pays it at startup and not in its first eviction."""
    nb = 4
    st = np.zeros((8, FIELDS), np.int64)
    st[:, KLEFT] = -1
    words = np.zeros((8, 2), np.int64)
    tab = np.zeros(16, np.int32)
    leaves = np.zeros((8, 2), np.int64)
    free = np.zeros(8, np.int64)
    meta = np.zeros(META, np.int64)
    pending = np.zeros(2 * nb, np.int64)
    row = np.zeros(256, np.int64)
    rank40 = np.zeros(2 * nb, np.int64)
    kw = np.array([0, 1, 2, 3, -1, -1], np.int64).tobytes()
    ids = np.empty(2, np.int64)
    insert(st, words, tab, leaves, free, meta, pending, row, nb, kw, bytes(2), True, 0, 1 << 62, ids, np.zeros(0, np.int64))
    access(st, words, tab, leaves, meta, pending, row, nb, kw[:32], 0, 1 << 62, ids)
    find(words, tab, kw, ids)
    out = np.zeros(2, np.int64)
    choose(st, leaves, meta, rank40, nb, 0, 2, out)
    choose(st, leaves, meta, rank40, nb, 64, 2, out)
    remove(st, words, tab, leaves, free, meta, kw[:32], np.zeros(0, np.int64), np.zeros(4, np.int64))
    remove(st, words, tab, leaves, free, meta, kw[:0], ids, np.zeros(4, np.int64))
    trim(st, words, tab, free, meta, np.zeros(0, np.int64), np.zeros(0, np.int64))
    history_cells(st, meta, np.zeros(256, np.int64), nb, np.zeros(8 * nb, np.int64))
    best_ratios(np.ones((2, 3)), np.arange(6.0).reshape(2, 3), 2, np.zeros((2, nb)))
    rehash(st, words, np.zeros(16, np.int32), meta)
