#!/usr/bin/env python3
"""Eviction-policy benchmark: prefix hit rate of the default policy, LRU and Belady on a FAST'25 trace.

Usage: python tools/bench_replay.py [TRACE_DIR_OR_FILE] [--policy NAME]

TRACE defaults to ../shared/traces (resolved against the repository root); a directory means
its conversation_trace.jsonl. Capacities: 500, 2000, 8000 and 32000 blocks. Target: the policy
is >= LRU at every capacity and >= 1.15x LRU as a geometric mean. The last line is JSON.
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

CAPACITIES = [500, 2000, 8000, 32000]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?", default="../shared/traces")
    ap.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES))
    args = ap.parse_args(argv)
    path = args.trace if os.path.isabs(args.trace) else os.path.normpath(os.path.join(REPO, args.trace))
    if os.path.isdir(path):
        path = os.path.join(path, "conversation_trace.jsonl")
    if not os.path.exists(path):
        print(f"bench_replay: no trace at {path}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    trace = load_trace(path)
    report = compare(trace, CAPACITIES, args.policy)
    print(format_report(report))
    gains = [p / l for p, l in zip(report["policy"], report["lru"])]
    ok = all(g >= 1.0 for g in gains) and report["geomean_gain_vs_lru"] >= 1.15
    print(f"target (>= lru at every capacity, geomean >= 1.15x): {'met' if ok else 'NOT met'}; "
          f"{time.perf_counter() - t0:.1f} s")
    print(json_line(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
