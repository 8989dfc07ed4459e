"""``lhd`` takes exactly the decisions of its previous, pure-Python implementation (kept as
the oracle in ``lhd_reference.py``): the same victims in the same order after any sequence
of the index's calls, and the same hits replayed through the real index."""

from __future__ import annotations

import random

import pytest

from kvpool import tracegen
from kvpool.master.eviction import BlockInfo, HitDensityPolicy
from kvpool.replay import replay

from .lhd_reference import ReferenceHitDensityPolicy


def k(i: int) -> bytes:
    return i.to_bytes(4, "big")


#: Key widths: the policy reads a 16-byte key back from its words and keeps any other key
#: itself (its words are a digest), so both kinds, and a mix of them, are compared.
WIDTHS = {
    "4": k,
    "16": lambda i: i.to_bytes(16, "big"),
    "mixed": lambda i: i.to_bytes(16 if i % 3 else 4, "big"),
}


class Busy(HitDensityPolicy):
    """Refreshes and history trims every few hundred references, so a short script covers them."""

    HISTORY_MIN = 300
    HISTORY_PER_BLOCK = 2
    REFRESH_MIN = 40


class BusyReference(ReferenceHitDensityPolicy):
    HISTORY_MIN = 300
    HISTORY_PER_BLOCK = 2
    REFRESH_MIN = 40


def script(seed: int, steps: int, k=k):
    """The index's calls, at random: chain puts (some extending a resident leaf), batches
    that are not one chain (or list a key twice), re-inserts of resident keys, accesses with
    repeats and unknown
    keys, removals of any block (interior ones leave dead slots), and selections where
    the index refuses some keys."""
    rnd = random.Random(seed)
    resident: list[bytes] = []
    for _ in range(steps):
        r = rnd.random()
        if r < 0.35:
            n = rnd.randint(1, 10)
            ks = list(dict.fromkeys(k(rnd.randrange(900)) for _ in range(n)))
            head = rnd.choice(resident) if resident and rnd.random() < 0.5 else None
            if head in ks:  # a block is never its own ancestor
                head = None
            if rnd.random() < 0.8:  # one chain
                infos = [BlockInfo(1, i, "", ks[i - 1] if i else head, i == len(ks) - 1) for i in range(len(ks))]
            else:  # parents anywhere in the batch, resident, unknown, none (never the key itself)
                pool = ks + resident[-20:] + [k(5000)]
                parents = [rnd.choice(pool) if rnd.random() < 0.7 else None for _ in ks]
                infos = [BlockInfo(1, -1, "", None if p == x else p, rnd.random() < 0.3)
                         for x, p in zip(ks, parents)]
            if rnd.random() < 0.05:  # a key listed twice: the batch is taken one key at a time
                ks, infos = ks + [ks[-1]], infos + [BlockInfo(1, -1, "", None, False)]
            yield ("insert", ks, infos)
            resident = [x for x in resident if x not in set(ks)] + list(dict.fromkeys(ks))
        elif r < 0.6 and resident:
            hit = [rnd.choice(resident) for _ in range(rnd.randint(1, 12))] + [k(7000)]
            yield ("access", hit)
        elif r < 0.75 and resident:
            gone = [rnd.choice(resident) for _ in range(rnd.randint(1, 4))]
            yield ("remove", gone)
            resident = [x for x in resident if x not in set(gone)]
        else:
            count = rnd.randint(1, 30)
            refused = set(rnd.sample(resident, min(len(resident), rnd.randint(0, 8))))
            yield ("select", count, refused)
        if len(resident) > 400:
            yield ("remove", resident[:50])
            resident = resident[50:]


class Sampling(Busy):
    """Samples with a few hundred leaves (the real sample size needs tens of thousands)."""

    SAMPLES = 2


class SamplingReference(BusyReference):
    SAMPLES = 2


@pytest.mark.parametrize("seed,sampling,width", [
    (0, False, "4"), (1, False, "4"), (2, False, "4"), (3, False, "4"), (4, True, "4"), (5, True, "4"),
    (6, False, "16"), (7, False, "mixed"), (8, True, "mixed"),
])
def test_same_decisions_as_the_reference_on_any_calls(seed, sampling, width):
    """``sampling``: most selections sample leaves, drawing from the random stream."""
    new, old = (Sampling, SamplingReference) if sampling else (Busy, BusyReference)
    new, old = new(seed=seed), old(seed=seed)
    selections = 0
    for call in script(seed, 2500, WIDTHS[width]):
        if call[0] == "insert":
            new.insert_many(call[1], call[2])
            old.insert_many(call[1], call[2])
        elif call[0] == "access":
            new.access_many(call[1])
            old.access_many(call[1])
        elif call[0] == "remove":
            new.remove_many(call[1])
            old.remove_many(call[1])
        else:
            _, count, refused = call
            asked_new: list[bytes] = []
            asked_old: list[bytes] = []

            def ev(log):
                return lambda key: (log.append(key), key not in refused)[1]

            got = new.select_victims(count, ev(asked_new))
            assert got == old.select_victims(count, ev(asked_old))
            assert not set(got) & refused
            selections += 1
            if got:  # the index evicts what it took: all of them (usual), or fewer
                taken = got if selections % 3 else got[: count // 2 + 1]
                new.remove_many(taken)
                old.remove_many(taken)
        assert len(new) == len(old)
        assert new.history_len == old.history_len
    assert selections > 200
    assert new.select_victims(10_000, lambda key: True) == old.select_victims(10_000, lambda key: True)


def test_same_hits_as_the_reference_through_the_real_index():
    trace = tracegen.conversations(1500, seed=3)
    for capacity in (60, 400):
        new = replay(trace, HitDensityPolicy(), capacity)
        old = replay(trace, ReferenceHitDensityPolicy(), capacity)
        assert new.evictions > 100
        assert (new.hit_blocks, new.evictions, new.inserts) == (old.hit_blocks, old.evictions, old.inserts)


def test_calls_made_before_the_kernels_load_are_kept_and_replayed_in_order(monkeypatch):
    """A master's first requests do not wait for numba: until the kernels are loaded the
    policy keeps its calls and replays them, with the same decisions as if they had been
    loaded from the start."""
    from kvpool.master import eviction

    eviction._load_kernels()
    calls = [c for c in script(11, 300) if c[0] != "select"][:40]
    loaded = Busy(seed=11)
    for call in calls:
        getattr(loaded, call[0] + "_many")(*call[1:])
    monkeypatch.setattr(eviction, "_kernels", None)                   # not loaded yet ...
    monkeypatch.setattr(eviction, "_load_kernels_soon", lambda: None)  # ... and still loading
    late = Busy(seed=11)
    kept = 0
    for call in calls:
        getattr(late, call[0] + "_many")(*call[1:])
        kept += 1
    assert kept == 40 and late._backlog is not None and len(late._backlog) == kept
    monkeypatch.undo()  # loaded now: the next call replays what was kept, then itself
    assert late.select_victims(10_000, lambda key: True) == loaded.select_victims(10_000, lambda key: True)
    assert late._backlog is None and late.history_len == loaded.history_len


def test_the_kernels_load_only_where_an_lhd_policy_runs():
    """Importing the policies costs no numba import (the CLI, clients); building an index
    loads the default policy's kernels (before a master answers)."""
    import subprocess
    import sys

    probe = ("import sys, kvpool.master.eviction as e; assert 'numba' not in sys.modules; "
             "from kvpool.master.index import BlockIndex; from kvpool.master.nodes import NodeRegistry; "
             "BlockIndex(NodeRegistry()); "
             "assert 'numba' in sys.modules and e._kernels is not None; print('ok')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
