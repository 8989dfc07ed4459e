#!/usr/bin/env python3
"""Eviction-policy benchmark: prefix hit rate of the default policy, LRU and Belady on a FAST'25 trace.

Usage: python tools/bench_replay.py [TRACE_DIR_OR_FILE] [--policy NAME] [--repeat N] [--synthetic]

TRACE defaults to the shared traces folder beside the repository (``../shared/traces``, or
``../../shared/traces`` from a worktree); a directory means its conversation_trace.jsonl.
Capacities: 500, 2,000, 8,000 and 32,000 blocks, replayed through the master's real index
(``kvpool.replay``). Belady's MIN in the same run is the ceiling; each cell reports the
fraction of it reached. Target: >= LRU at every capacity, >= 1.30x LRU as a geometric mean,
<= 2 us of policy CPU per block reference. The policy and LRU are replayed ``--repeat`` times
(3) per capacity and each cost is the median of its runs: on the shared development machines
one run's timing moves by a third from one run to the next, while the hit rates never change.

``--synthetic`` first replays the seeded synthetic traces of ``kvpool.tracegen`` (other
shapes of traffic, a generalization check that nothing was fitted to) and prints a table and
a JSON line for each. The last line is always the JSON line of the FAST'25 trace:
{"bench":"replay","capacities":[...],"policy":[...],"lru":[...],"belady":[...],
 "geomean_gain_vs_lru":...,"min_gain_vs_lru":...,"us_per_ref":...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kvpool.cli.replay import format_report, json_line  # noqa: E402
from kvpool.master.eviction import DEFAULT_POLICY, POLICIES  # noqa: E402
from kvpool.replay import compare, load_trace  # noqa: E402
from kvpool.tracegen import GENERATORS  # noqa: E402

CAPACITIES = [500, 2000, 8000, 32000]
TARGET_GEOMEAN = 1.30
TARGET_US_PER_REF = 2.0


def default_trace_dir() -> str:
    for rel in ("../shared/traces", "../../shared/traces"):
        path = os.path.normpath(os.path.join(REPO, rel))
        if os.path.isdir(path):
            return path
    return os.path.normpath(os.path.join(REPO, "../shared/traces"))


def verdict(report: dict) -> str:
    gains = [p / l for p, l in zip(report["policy"], report["lru"]) if l]
    parts = [
        f">= lru at every capacity: {'yes' if gains and all(g >= 1.0 for g in gains) else 'NO'}",
        f"geomean {report['geomean_gain_vs_lru']}x (target >= {TARGET_GEOMEAN})",
        f"us_per_ref {report['us_per_ref']} (target <= {TARGET_US_PER_REF})",
        f"whole replay loop (index + policy + checks) {report['loop_us_per_ref_by_capacity']} us/ref",
    ]
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?", default=None)
    ap.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES))
    ap.add_argument("--repeat", type=int, default=3, help="runs per capacity; costs are their medians (default 3)")
    ap.add_argument("--synthetic", action="store_true", help="also replay the seeded synthetic traces first")
    args = ap.parse_args(argv)
    path = args.trace or default_trace_dir()
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(REPO, path))
    if os.path.isdir(path):
        path = os.path.join(path, "conversation_trace.jsonl")
    if not os.path.exists(path):
        print(f"bench_replay: no trace at {path}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.synthetic:
        for name, gen in GENERATORS.items():
            report = compare(gen(seed=0), CAPACITIES, args.policy)
            print(format_report(report))
            print(json.dumps({"trace": name, **json.loads(json_line(report))}, separators=(",", ":")))
            print()
    report = compare(load_trace(path), CAPACITIES, args.policy, repeat=args.repeat)
    print(format_report(report))
    print(f"each run's us/ref per capacity: {report['us_per_ref_runs']}")
    print(f"{verdict(report)}; {time.perf_counter() - t0:.1f} s")
    print(json_line(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
