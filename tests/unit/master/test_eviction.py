"""Eviction policies on their own: the LRU baseline, paced admission and learned hit density."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.master.eviction import (
    DEFAULT_POLICY,
    POLICIES,
    BlockInfo,
    EvictionPolicy,
    HitDensityPolicy,
    LRUPolicy,
    PacedAdmissionPolicy,
    make_policy,
)


def k(i: int) -> bytes:
    return i.to_bytes(4, "big")


def everything(_key: bytes) -> bool:
    return True


# ---------------------------------------------------------------------------- registry


def test_registry_and_default():
    assert POLICIES["lru"] is LRUPolicy
    assert POLICIES["paced"] is PacedAdmissionPolicy
    assert DEFAULT_POLICY == "lhd"
    assert isinstance(make_policy(), HitDensityPolicy)
    assert isinstance(make_policy("lru"), LRUPolicy)
    for name, cls in POLICIES.items():
        assert cls.name == name and issubclass(cls, EvictionPolicy)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("nope")


# ---------------------------------------------------------------------------- LRU


def test_lru_order_access_and_remove():
    p = LRUPolicy()
    for i in range(4):
        p.insert(k(i), BlockInfo(size=1, position=i))
    p.access(k(0))
    p.access(k(99))  # unknown: ignored
    assert len(p) == 4
    assert p.select_victims(2, everything) == [k(1), k(2)]
    assert len(p) == 4  # selecting does not remove
    p.remove(k(1))
    p.remove(k(1))  # twice is harmless
    assert len(p) == 3
    assert p.select_victims(10, everything) == [k(2), k(3), k(0)]


def test_lru_respects_evictable_and_count():
    p = LRUPolicy()
    for i in range(5):
        p.insert(k(i), BlockInfo(size=1))
    assert p.select_victims(2, lambda key: key not in (k(0), k(2))) == [k(1), k(3)]
    assert p.select_victims(0, everything) == []
    assert p.select_victims(3, lambda key: False) == []


# ---------------------------------------------------------------------------- paced


def chain(p: EvictionPolicy, ids, start: int = 0) -> None:
    for pos, i in enumerate(ids, start):
        p.insert(k(i), BlockInfo(size=1, position=pos))


def test_paced_starts_as_lru_for_interior_blocks():
    p = PacedAdmissionPolicy()
    chain(p, [1, 2, 3])
    assert p.admit_fraction == 1.0
    # The run is still open (its tail is not known to be a leaf yet): plain LRU order.
    assert p.select_victims(3, everything) == [k(1), k(2), k(3)]
    assert len(p) == 3


def test_paced_demotes_the_tail_of_a_finished_chain():
    p, lru = PacedAdmissionPolicy(), LRUPolicy()
    for pol in (p, lru):
        chain(pol, [1, 2, 3])
        pol.access(k(1))  # the next request starts again at position 0: block 3 was a leaf
    assert lru.select_victims(1, everything) == [k(2)]
    assert p.select_victims(1, everything) == [k(3)]
    assert p.select_victims(3, everything) == [k(3), k(2), k(1)]


def test_paced_needs_positions_for_leaves():
    p = PacedAdmissionPolicy()
    for i in (1, 2, 3):
        p.insert(k(i), BlockInfo(size=4096, position=-1))  # live master: position unknown
    p.access(k(1))
    assert p.select_victims(3, everything) == [k(2), k(3), k(1)]


def test_paced_a_gap_in_the_chain_is_not_a_leaf():
    p = PacedAdmissionPolicy()
    chain(p, [1, 2])
    p.insert(k(4), BlockInfo(size=1, position=3))  # position 2 is resident elsewhere: a gap
    assert p.select_victims(3, everything) == [k(1), k(2), k(4)]


class Stingy(PacedAdmissionPolicy):
    INITIAL_ADMIT = 0.0


def test_paced_admits_first_seen_blocks_at_its_pace_and_seen_ones_always():
    p = Stingy()
    for i in (1, 2, 3):  # three one-block runs, positions unknown
        p.insert(k(i), BlockInfo(size=1))
    # The credit starts at zero, so the first run is admitted; the next two go to probation,
    # which is evicted first, oldest first.
    assert p.select_victims(3, everything) == [k(2), k(3), k(1)]
    p.remove(k(2))
    p.insert(k(2), BlockInfo(size=1))  # referenced before: admitted to main
    assert p.select_victims(3, everything) == [k(3), k(1), k(2)]


def test_paced_access_promotes_out_of_probation():
    p = Stingy()
    for i in (1, 2, 3):
        p.insert(k(i), BlockInfo(size=1))
    p.access(k(2))
    assert p.select_victims(3, everything) == [k(3), k(1), k(2)]


def test_paced_respects_evictable_count_and_remove():
    p = PacedAdmissionPolicy()
    chain(p, range(6))
    assert p.select_victims(2, lambda key: key not in (k(0), k(2))) == [k(1), k(3)]
    assert p.select_victims(0, everything) == []
    assert p.select_victims(5, lambda key: False) == []
    p.remove(k(3))
    p.remove(k(3))
    p.remove(k(77))
    p.access(k(3))  # gone: ignored
    assert len(p) == 5
    assert k(3) not in p.select_victims(10, everything)


def test_paced_slows_admission_when_admitted_blocks_die_young():
    p = PacedAdmissionPolicy()
    # Nothing is reused within the ~8 calls a block lives: admitting everything is useless.
    for i in range(2000):
        p.insert(k(i), BlockInfo(size=1, position=-1))
        if len(p) > 8:
            victims = p.select_victims(len(p) - 8, everything)
            for v in victims:
                p.remove(v)
    assert p.admit_fraction < 0.1
    # A Remove (not an eviction) does not move the pace.
    before = p.admit_fraction
    q = next(iter(p.select_victims(1, everything)))
    p.select_victims(0, everything)  # forget the selection
    p.remove(q)
    assert p.admit_fraction == before


def test_paced_history_is_bounded():
    class Small(PacedAdmissionPolicy):
        HISTORY_MIN = 100
        HISTORY_MULT = 1

    p = Small()
    for i in range(5000):
        p.insert(k(i), BlockInfo(size=1, position=-1))
        p.remove(k(i))
    assert len(p) == 0
    assert len(p._history) <= 2 * 1100


# ---------------------------------------------------------------------------- all policies


ops = st.lists(
    st.tuples(st.sampled_from(["insert", "access", "remove", "select"]), st.integers(0, 15), st.integers(-1, 5)),
    max_size=200,
)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=60, deadline=None)
@given(script=ops)
def test_policy_contract_against_a_model(name, script):
    p = make_policy(name)
    resident: set[bytes] = set()
    for op, i, pos in script:
        key = k(i)
        if op == "insert" and key not in resident:
            p.insert(key, BlockInfo(size=1, position=pos))
            resident.add(key)
        elif op == "access":
            p.access(key)
        elif op == "remove":
            p.remove(key)
            resident.discard(key)
        elif op == "select":
            protected = {k(j) for j in range(pos + 1, pos + 4)}
            victims = p.select_victims(i % 6, lambda x: x not in protected)
            assert len(victims) == len(set(victims)) <= i % 6
            assert set(victims) <= resident - protected
            if len(victims) < i % 6:  # fewer only when nothing else is evictable
                assert set(victims) == resident - protected
            for v in victims[: len(victims) // 2 + 1]:
                p.remove(v)
                resident.discard(v)
        assert len(p) == len(resident)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_access_many_equals_access_in_order(name):
    """The master batches accesses; the policy must end in the same state as one by one."""
    import random

    rng = random.Random(3)
    keys = [bytes([i % 256, i // 256]) * 8 for i in range(600)]
    a, b = make_policy(name), make_policy(name)
    calls = []
    for i, k in enumerate(keys):
        info = BlockInfo(size=1, position=i % 40)
        a.insert(k, info)
        b.insert(k, info)
    for _ in range(40):
        batch = rng.sample(keys, 50) + [b"\xff" * 16]   # includes a key never inserted
        calls.append(batch)
        for k in batch:
            a.access(k)
        b.access_many(batch)
        victims_a = a.select_victims(20, lambda k: True)
        victims_b = b.select_victims(20, lambda k: True)
        assert victims_a == victims_b
        for k in victims_a[:5]:
            a.remove(k)
            b.remove(k)
    assert len(a) == len(b)
    assert a.select_victims(10_000, lambda k: True) == b.select_victims(10_000, lambda k: True)


# ---------------------------------------------------------------------------- lhd


def chain_infos(ks, start=0):
    return [BlockInfo(1, start + i, "", ks[i - 1] if i else None, i == len(ks) - 1) for i in range(len(ks))]


def test_lhd_evicts_leaves_first_and_peels_a_chain_from_its_tail():
    p = HitDensityPolicy()
    a, b, c = k(1), k(2), k(3)
    p.insert_many([a, b, c], chain_infos([a, b, c]))
    assert p.select_victims(1, everything) == [c]          # a is older, but c is the only leaf
    assert p.select_victims(3, everything) == [c, b, a]    # b, then a, become leaves in the same call


def test_lhd_takes_an_interior_block_only_when_no_leaf_is_evictable():
    p = HitDensityPolicy()
    a, b, c = k(1), k(2), k(3)
    p.insert_many([a, b, c], chain_infos([a, b, c]))
    assert p.select_victims(1, lambda key: key != c) == [a]  # the pinned leaf keeps the chain
    p.remove(b)  # an interior block removed (Remove, Flush): its child still counts as a leaf
    p.remove(a)
    assert len(p) == 1 and p.select_victims(2, everything) == [c]


def test_lhd_learns_that_blocks_near_their_reuse_age_are_worth_more_than_fresh_ones():
    """Every key is referenced twice, 500 references apart: a fresh key is 500 references from
    its reuse and one of age 400 only 100, so the older one is denser and the fresh one goes
    first, the opposite of LRU. That is admission control, learned."""
    p = HitDensityPolicy()
    gap = 500
    for i in range(20_000):
        p.insert(k(i), BlockInfo(1))
        if i >= gap:
            p.access(k(i - gap))  # its second and last reference
        if i >= gap + 50:
            p.remove(k(i - gap - 50))
    fresh, old = k(19_999), k(19_999 - 400)
    assert p.density(fresh) < p.density(old)
    victims = p.select_victims(1, everything)
    assert victims != [k(19_999 - 549)]  # not the LRU choice


def test_lhd_history_is_bounded():
    class Small(HitDensityPolicy):
        HISTORY_MIN = 512
        REFRESH_MIN = 64

    p = Small()
    for i in range(20_000):
        p.insert(k(i), BlockInfo(1))
        p.remove(k(i))
        # trimmed to the cap when half of it has been referenced since the last trim
        assert p.history_len <= 512 + 512 // 2 + 64 + 1
    assert p.history_len >= 400  # it does remember


def test_lhd_python_and_numpy_age_bins_agree():
    """The per-key paths bin ages in Python, the vectorized ones with searchsorted: one scale."""
    import numpy as np

    from kvpool.master.eviction import _age_bin

    p = HitDensityPolicy()
    ages = np.array(sorted({0, 1, 2, 3, 4, 5, 7, 8, 9, 1023, 1024, 1025, 3 << 20, (1 << 32) - 1, 1 << 40}
                           | set(np.random.default_rng(0).integers(0, 1 << 36, 2000).tolist())))
    vec = np.searchsorted(p._edges, ages, "right")
    assert [min(_age_bin(int(a)), p.BINS - 1) for a in ages] == vec.tolist()


def test_lhd_compiled_age_bins_agree_with_the_arithmetic():
    """The kernels find an age's bin from its top bit; the densities are learned with the
    Python arithmetic: one scale, at every power of two and around it, and capped."""
    from kvpool.master import hit_density_kernels
    from kvpool.master.eviction import _age_bin_capped

    nb = HitDensityPolicy.BINS
    ages = list(range(0, 5000)) + [(1 << 62) - 1]
    ages += [(1 << e) + d for e in range(2, 62) for d in (-3, -1, 0, 1, 3)]
    ages += [(5 << e) + d for e in range(2, 59) for d in (-1, 0, 1)]
    assert [hit_density_kernels.age_bin(a, nb) for a in ages] == [_age_bin_capped(a, nb) for a in ages]
    assert hit_density_kernels.age_bin(-5, nb) == 0


def test_lhd_chain_batches_and_one_block_at_a_time_agree():
    """A put's chain is inserted list by list (the fast path); one block at a time takes the
    per-key path. With removals (free and dead slots), re-inserted keys (history counts)
    and chains that extend a resident leaf, both must leave the same state."""
    import random

    rnd = random.Random(7)
    batch, single = HitDensityPolicy(), HitDensityPolicy()
    resident: list[bytes] = []
    for step in range(600):
        n = rnd.randint(2, 12)
        ks = [k(rnd.randrange(3000)) for _ in range(n)]
        ks = [x for x in dict.fromkeys(ks) if x not in set(resident)]
        if len(ks) < 2:
            continue
        head = rnd.choice(resident) if resident and rnd.random() < 0.5 else None
        infos = [BlockInfo(1, i, "", ks[i - 1] if i else head, i == len(ks) - 1) for i in range(len(ks))]
        batch.insert_many(ks, infos)
        for key, info in zip(ks, infos):
            single.insert(key, info)
        resident += ks
        if rnd.random() < 0.3:
            hit = rnd.sample(resident, min(5, len(resident)))
            batch.access_many(hit)
            single.access_many(hit)
        while len(resident) > 200:
            gone = resident.pop(rnd.randrange(len(resident)))
            batch.remove(gone)
            single.remove(gone)
    assert batch._now == single._now and batch.history_len == single.history_len
    assert [batch.density(x) for x in resident] == [single.density(x) for x in resident]
    assert batch.select_victims(10_000, everything) == single.select_victims(10_000, everything)


# ---------------------------------------------------------------------------- batch calls


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_remove_many_equals_remove_in_order(name):
    """The index tells an eviction's victims in one remove_many; the policy must end in the
    same state as told one by one (chains peeled from the tail, dead interior blocks, keys
    never inserted, keys listed twice)."""
    import random

    rng = random.Random(5)
    a, b = make_policy(name), make_policy(name)
    resident: list[bytes] = []
    for step in range(120):
        ks = [k(10_000 + 20 * step + j) for j in range(rng.randint(1, 8))]
        infos = chain_infos(ks)
        a.insert_many(ks, infos)
        b.insert_many(ks, infos)
        resident += ks
        if len(resident) > 150:
            gone = a.select_victims(12, everything)
            assert gone == b.select_victims(12, everything)
            gone += rng.sample([x for x in resident if x not in gone], 3)  # a Remove: any block
            gone += [gone[0], k(1)]                                         # twice; never inserted
            for key in gone:
                a.remove(key)
            b.remove_many(gone)
            resident = [x for x in resident if x not in set(gone)]
        assert len(a) == len(b) == len(resident)
    assert a.select_victims(10_000, everything) == b.select_victims(10_000, everything)
