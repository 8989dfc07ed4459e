"""The ``lhd`` kernels' key table: every key entered is found, every key taken out is not,
whatever the collisions, against a dict doing the same."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvpool.master import eviction
from kvpool.master.eviction import HitDensityPolicy, key_words

k = pytest.importorskip("kvpool.master.hit_density_kernels")


@pytest.mark.parametrize("cells", [8, 64, 1 << 12])
def test_table_matches_a_dict_under_adds_and_deletes(cells):
    """Backward-shift deletion keeps every probe run whole: with 8 cells nearly every key
    collides, and a wrong shift would lose a key that is still in."""
    rnd = random.Random(cells)
    ids = cells // 2  # the table is never more than half full
    words = np.zeros((ids, 2), np.int64)  # id -> its key's words
    tab = np.zeros(cells, np.int32)
    model: dict[bytes, int] = {}
    free = list(range(ids))
    universe = [rnd.randbytes(16) for _ in range(3 * ids)] + [i.to_bytes(16, "little") for i in range(ids)]
    for _ in range(4000):
        key = rnd.choice(universe)
        if key in model and rnd.random() < 0.6:
            s = model.pop(key)
            k._tab_del(words, tab, s)
            free.append(s)
        elif key not in model and free:
            s = free.pop(rnd.randrange(len(free)))
            w = np.frombuffer(key_words([key]), np.int64)
            words[s] = w
            k._tab_add(words, tab, s)
            model[key] = s
        found = np.empty(len(universe), np.int64)
        k.find(words, tab, key_words(universe), found)
        assert found.tolist() == [model.get(x, -1) for x in universe]
    assert np.count_nonzero(tab) == len(model)


def test_keys_of_other_lengths_are_digested_and_sixteen_byte_keys_are_not():
    """A 16-byte key is its own words; any other length goes through xxh3-128, also in a
    batch that mixes lengths whose total happens to be 16 bytes a key."""
    raw = bytes(range(16))
    assert key_words([raw]) == raw
    mixed = [b"x" * 8, b"y" * 24]
    assert key_words(mixed) == eviction._digest(mixed[0]) + eviction._digest(mixed[1])
    assert key_words([raw, b"abc"]) == raw + eviction._digest(b"abc")
    assert key_words([]) == b""


def test_state_rows_are_whole_cache_lines_also_after_growing():
    """Each id's fields are one 64-byte line (what the per-block work reads), so the array
    starts on a line boundary, including after it grew past the history's floor."""
    from kvpool.master.eviction import BlockInfo, HitDensityPolicy

    class Small(HitDensityPolicy):
        HISTORY_MIN = 64

    p = Small()
    p._attach(wait=True)
    assert p._st.strides == (64, 8) and p._st.ctypes.data % 64 == 0
    first = p._st.shape[0]
    keys = [i.to_bytes(16, "little") for i in range(3 * first)]
    for i in range(0, len(keys), 8):
        chain = keys[i:i + 8]
        p.insert_many(chain, [BlockInfo(1, j, "", chain[j - 1] if j else None, j == 7) for j in range(8)])
    assert p._st.shape[0] > first and p._st.ctypes.data % 64 == 0 and p._st.flags.c_contiguous
    assert sorted(p.select_victims(len(keys), lambda key: True)) == sorted(keys)  # the keys read back from words


def test_compiled_densities_equal_the_numpy_broadcast_to_the_last_bit():
    """``best_ratios`` replaced a numpy broadcast over (class, start bin, end bin); the
    densities, and so every rank and decision, must not move by one bit. Random reuse and
    exit counts, with histories that span few to all age bins, and halved statistics."""
    from .lhd_reference import ReferenceHitDensityPolicy

    new, old = HitDensityPolicy(), ReferenceHitDensityPolicy()
    nc, nb = 2 * new.COUNT_BUCKETS, new.BINS
    rng = np.random.default_rng(7)
    nonzero = 0
    for case in range(60):
        top = int(rng.integers(1, nb + 1))
        reused = rng.poisson(rng.uniform(0.05, 40), (nc, nb)).astype(np.float64)
        exits = reused + rng.poisson(rng.uniform(0.05, 40), (nc, nb))
        reused[:, top:] = 0
        exits[:, top:] = 0
        if case % 3 == 0:
            reused *= 0.5
            exits *= 0.5
        got, want = new.densities(reused, exits), old.densities(reused, exits)
        assert got.tobytes() == want.tobytes(), case
        nonzero += int((got > 0).sum())
    assert nonzero > 1000
    empty = np.zeros((nc, nb))
    assert not new.densities(empty, empty).any()
