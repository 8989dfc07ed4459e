"""The replay tool: hand-checked hit rates on short traces, and that it drives the real policies."""

from __future__ import annotations

import argparse
import json

import pytest

from kvpool.master.eviction import POLICIES, LRUPolicy, PacedAdmissionPolicy
from kvpool.replay import PolicyContractError, Trace, belady, block_key, compare, load_trace, replay

# Four conversations' worth of prompts over a shared root block 0, capacity 4 blocks.
# Worked by hand (see the comments in each test); 15 blocks in all.
TRACE = [
    [0, 1, 2],
    [0, 3, 4],
    [0, 1, 5],
    [0, 3, 6],
    [0, 1, 2],
]


def test_lru_by_hand():
    # r1 misses 0,1,2.          LRU order 0,1,2
    # r2 hits 0; evicts 1.      order 2,0,3,4                  hits 1
    # r3 hits 0 (1 is gone); 1 and 5 missing: evicts 2,3.  order 4,0,1,5   hits 1
    # r4 hits 0 (3 is gone); evicts 4,1.  order 5,0,3,6       hits 1
    # r5 hits 0; evicts 5,3.                                   hits 1
    r = replay(TRACE, LRUPolicy(), 4)
    assert (r.hit_blocks, r.total_blocks) == (4, 15)
    assert r.evictions == 7 and r.inserts == 11


def test_paced_by_hand():
    # Calls per request: commit inserts, then the lease release reports the hits.
    # r1 inserts 0,1,2 into main (pace 1.0).
    # r2 hits 0 (leased). 3,4 need one slot: probation is empty, main is 0,1,2 and 0 is
    #    pinned, so 1 goes. Inserting 3 at position 1 ends r1's run: 2 to probation. The
    #    release touches 0 at position 0, which ends r2's run: 4 to probation.   hits 1
    # r3 hits 0 (1 is gone); 1 and 5 need two slots: probation 4, 2.           hits 1
    # r4 hits 0 and 3; 6 needs one: 5, r3's tail, from probation.              hits 2
    # r5 hits 0 and 1; 2 needs one: 6, r4's tail.                              hits 2
    r = replay(TRACE, PacedAdmissionPolicy(), 4)
    assert (r.hit_blocks, r.total_blocks) == (6, 15)
    assert r.evictions == 5


def test_belady_by_hand():
    # Next uses: 2 is next needed in r5, 4/5/6 never, 1 in r3 then r5, 3 in r4.
    # r2 evicts 2 (farthest: r5), r3 evicts 4 (never), r4 evicts 5 (never; 1 is needed in r5),
    # r5 evicts 6 (never, deeper than 3): hits 1 + 2 + 2 + 2 = 7.
    r = belady(TRACE, 4)
    assert (r.hit_blocks, r.total_blocks) == (7, 15)


def test_belady_beats_lru_and_paced_on_single_block_requests():
    # 1,2,3,1,2 at capacity 2: LRU always evicts what comes next (0 hits). The paced policy
    # demotes each one-block request's block as a leaf and ends up the same (0 hits). MIN
    # evicts 2 at the third request and hits 1 once: 1/5.
    tr = [[1], [2], [3], [1], [2]]
    assert replay(tr, LRUPolicy(), 2).hit_blocks == 0
    assert replay(tr, PacedAdmissionPolicy(), 2).hit_blocks == 0
    assert belady(tr, 2).hit_blocks == 1
    assert belady(tr, 2).hit_rate == pytest.approx(0.2)


def test_unbounded_capacity_is_the_same_for_everyone():
    tr = TRACE * 3
    best = sum(len(r) for r in tr) - len({b for r in tr for b in r})  # only compulsory misses
    for name in POLICIES:
        assert replay(tr, name, 1000).hit_blocks == best
    assert belady(tr, 1000).hit_blocks == best


class Recorder(LRUPolicy):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.calls = []

    def insert(self, key, info):
        self.calls.append(("insert", key, info))
        super().insert(key, info)

    def access(self, key):
        self.calls.append(("access", key))
        super().access(key)

    def access_many(self, keys):
        for key in keys:
            self.access(key)

    def remove(self, key):
        self.calls.append(("remove", key))
        super().remove(key)

    def remove_many(self, keys):
        for key in keys:
            self.remove(key)

    def select_victims(self, count, evictable):
        out = super().select_victims(count, evictable)
        self.calls.append(("select", count, tuple(out)))
        return out


def calls_of(p):
    """The recorded calls with each BlockInfo cut to (position, parent, last)."""
    return [(c[0], c[1], (c[2].position, c[2].parent, c[2].last)) if c[0] == "insert" else c for c in p.calls]


def test_replay_makes_the_master_calls():
    p = Recorder()
    replay([[0, 1, 2], [0, 3], [0, 1, 4]], p, 4)
    b = block_key
    assert calls_of(p) == [
        # r1 publishes its chain: parents and the chain's last block come from the put.
        ("insert", b(0), (0, None, False)), ("insert", b(1), (1, b(0), False)), ("insert", b(2), (2, b(1), True)),
        # r2 hits 0 (leased, so the put does not touch it); the lease's end reports the read.
        ("insert", b(3), (1, b(0), True)), ("access", b(0)),
        # r3 hits 0 and 1; 4 needs room: one victim, and not 1, which r3 holds leased.
        ("select", 1, (b(2),)), ("remove", b(2)),
        ("insert", b(4), (2, b(1), True)), ("access", b(0)), ("access", b(1)),
    ]


def test_replay_dedups_present_blocks_past_the_first_miss():
    p = Recorder()
    # r2 needs one slot and LRU gives up block 0, so r3 misses at once although 1 and 2 are
    # still there: the publish step touches them (dedup) and only 0 is inserted again.
    replay([[0, 1, 2], [5, 6], [0, 1, 2]], p, 4)
    b = block_key
    assert calls_of(p)[-5:] == [
        ("access", b(1)), ("access", b(2)), ("select", 1, (b(5),)), ("remove", b(5)),
        ("insert", b(0), (0, None, False)),
    ]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_replay_drives_the_registry_classes(name, monkeypatch):
    made = []
    real = POLICIES[name]

    class Spy(real):
        def __init__(self):
            super().__init__()
            made.append(self)
            self.n = 0

        def insert_many(self, keys, infos):
            self.n += len(keys)
            super().insert_many(keys, infos)

    monkeypatch.setitem(POLICIES, name, Spy)
    r = replay(TRACE, name, 4)
    assert len(made) == 1 and isinstance(made[0], real)
    assert made[0].n == r.inserts > 0
    rep = compare(Trace(tuple(map(tuple, TRACE))), [2, 4], name)
    assert rep["capacities"] == [2, 4] and len(rep["policy"]) == 2


def test_replay_rejects_a_policy_that_breaks_the_contract():
    class Greedy(LRUPolicy):
        def select_victims(self, count, evictable):
            return list(self._order)[:count]  # oldest first, ignoring evictable

    with pytest.raises(PolicyContractError):
        replay([[0, 1, 2], [0, 3, 4]], Greedy(), 4)  # offers 0, which r2 holds leased


def test_a_request_bigger_than_the_pool_caches_its_head():
    r = replay([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]], LRUPolicy(), 3)
    assert r.uncached == 4 and r.hit_blocks == 3
    assert belady([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]], 3).hit_blocks == 3


def test_load_trace_and_cli(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"timestamp": i, "input_length": 1, "output_length": 1, "hash_ids": ids}) + "\n"
                            for i, ids in enumerate(TRACE)))
    tr = load_trace(path)
    assert tr.requests == tuple(map(tuple, TRACE)) and tr.total_blocks == 15

    from kvpool.cli import replay as cli

    parser = argparse.ArgumentParser(prog="kvpool")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", str(path), "--capacity", "4", "--capacity", "1000", "--policy", "paced"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "belady" in out[1]
    last = json.loads(out[-1])
    assert last["bench"] == "replay" and last["capacities"] == [4, 1000]
    assert last["policy"][0] == pytest.approx(6 / 15, abs=1e-6)
    assert last["lru"][0] == pytest.approx(4 / 15, abs=1e-6)
    assert last["belady"][0] == pytest.approx(7 / 15, abs=1e-6)
    assert last["geomean_gain_vs_lru"] == pytest.approx((6 / 4) ** 0.5, abs=1e-4)
    assert list(last) == ["bench", "capacities", "policy", "lru", "belady", "geomean_gain_vs_lru",
                          "min_gain_vs_lru", "us_per_ref"]
    assert last["min_gain_vs_lru"] == pytest.approx(1.0, abs=1e-6)  # at 1000 blocks everyone hits the same
    assert 0 < last["us_per_ref"] < 1000
    assert "of belady" in out[1] and "us/ref" in out[1]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    args = parser.parse_args(["replay", str(bad), "--capacity", "4", "--json"])
    assert args.func(args) == 2


@pytest.mark.parametrize("policy", ["lru", "lhd"])
def test_progress_counts_every_request_of_every_run(policy):
    from kvpool.replay import PROGRESS_EVERY, compare_runs

    n = 2 * PROGRESS_EVERY + 7                      # a remainder after the full batches
    trace = Trace(tuple((i % 50, i % 50 + 1000) for i in range(n)))
    calls: list[int] = []
    report = compare(trace, [8, 64], policy, progress=calls.append)
    runs = compare_runs(policy)
    assert runs == (2 if policy == "lru" else 3)
    assert sum(calls) == runs * 2 * n and max(calls) == PROGRESS_EVERY
    assert len(calls) == runs * 2 * 3               # two full batches and the rest, per run
    plain = compare(trace, [8, 64], policy)          # progress changes nothing it reports
    assert [report[k] for k in ("policy", "lru", "belady")] == [plain[k] for k in ("policy", "lru", "belady")]


def test_us_per_ref_is_the_policy_share_of_the_whole_loop():
    """``us_per_ref`` times every policy call (the eviction bookkeeping); the whole replay
    loop (index, policy, checks) is reported beside it and must cost more."""
    import random

    rng = random.Random(11)
    tr = Trace(tuple(tuple(range(s, s + rng.randint(1, 12))) for s in (rng.randrange(300) for _ in range(400))))
    report = compare(tr, [50, 200], "lhd", with_belady=False)
    policy, loop = report["us_per_ref_by_capacity"], report["loop_us_per_ref_by_capacity"]
    assert all(0 < p < l for p, l in zip(policy, loop)), (policy, loop)
    assert report["us_per_ref"] == max(policy)


def test_repeat_reports_the_median_cost_of_runs_that_agree(tmp_path):
    """``kvpool replay ... --repeat 3`` as typed: the hits are one run's (every run's, since a
    replay is deterministic) and the cost is the median of the runs, each of which is kept."""
    import statistics
    import subprocess
    import sys

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"timestamp": i, "input_length": 1, "output_length": 1, "hash_ids": ids}) + "\n"
                            for i, ids in enumerate(TRACE * 40)))
    run = subprocess.run([sys.executable, "-m", "kvpool", "replay", str(path), "--capacity", "4", "--capacity", "9",
                          "--repeat", "3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "the median of 3 runs" in run.stdout
    once = json.loads(subprocess.run([sys.executable, "-m", "kvpool", "replay", str(path), "--capacity", "4",
                                      "--capacity", "9", "--json"], capture_output=True, text=True, timeout=120,
                                     check=True).stdout)
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert [last[k] for k in ("policy", "lru", "belady")] == [once[k] for k in ("policy", "lru", "belady")]

    report = compare(load_trace(path), [4, 9], "lhd", repeat=3)
    assert report["repeat"] == 3 and [len(r) for r in report["us_per_ref_runs"]] == [3, 3]
    for median, runs in zip(report["us_per_ref_by_capacity"], report["us_per_ref_runs"]):
        assert median == pytest.approx(statistics.median(runs), abs=2e-3)
    assert report["us_per_ref"] == max(report["us_per_ref_by_capacity"])

    bad = subprocess.run([sys.executable, "-m", "kvpool", "replay", str(path), "--capacity", "4", "--repeat", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--repeat must be at least 1" in bad.stderr
