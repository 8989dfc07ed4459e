"""``kvpool replay TRACE --capacity BLOCKS [--capacity ...] [--policy NAME] [--json]``.

Replays a FAST'25 trace through the master's index with an eviction policy from the
registry, with LRU, and against Belady's MIN at each capacity. Prints a table (hit rates, the
gain over LRU, the fraction of Belady reached, and the policy's CPU per block reference) and,
as its last line, one JSON object. On a terminal a progress bar (stderr) counts the requests
replayed; under ``--json`` or off a terminal there is none.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["JSON_KEYS", "format_report", "json_line", "register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    from kvpool.master.eviction import DEFAULT_POLICY, POLICIES

    p = subparsers.add_parser(
        "replay",
        help="replay a FAST'25 trace against an eviction policy, LRU and Belady",
        description="Prefix hit rate of an eviction policy, LRU and Belady's MIN on a FAST'25 trace.",
    )
    p.add_argument("trace", metavar="TRACE", help="FAST'25 jsonl trace (one request per line with hash_ids)")
    p.add_argument(
        "--capacity", metavar="BLOCKS", type=int, action="append", required=True,
        help="cache capacity in blocks; repeat for several capacities",
    )
    p.add_argument(
        "--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES),
        help=f"policy to measure (default: {DEFAULT_POLICY})",
    )
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="replay the policy and LRU N times per capacity and report the median cost (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=run)
    return p


def format_report(report: dict) -> str:
    lines = [
        f"trace {report.get('trace', '')}: {report.get('requests', '?')} requests, "
        f"{report.get('blocks', '?')} blocks; policy {report['policy_name']!r}",
        f"{'capacity':>10} {'policy':>9} {'lru':>9} {'belady':>9} {'vs lru':>8} {'of belady':>10}"
        f" {'us/ref':>7} {'lru us/ref':>10}",
    ]
    us = report.get("us_per_ref_by_capacity") or [float("nan")] * len(report["capacities"])
    lru_us = report.get("lru_us_per_ref_by_capacity") or [float("nan")] * len(report["capacities"])
    for cap, p, l, b, u, lu in zip(report["capacities"], report["policy"], report["lru"], report["belady"], us, lru_us):
        gain = p / l if l else float("nan")
        frac = p / b if b else float("nan")
        lines.append(f"{cap:>10} {p:>9.4f} {l:>9.4f} {b if b is not None else float('nan'):>9.4f} {gain:>7.3f}x"
                     f" {frac:>10.3f} {u:>7.2f} {lu:>10.2f}")
    g = report["geomean_gain_vs_lru"]
    m = report.get("min_gain_vs_lru")
    lines.append(f"geometric mean gain vs lru: {g:.3f}x; worst cell: {m:.3f}x" if g and m else
                 "geometric mean gain vs lru: n/a (lru hit nothing at some capacity)")
    runs = report.get("repeat", 1)
    lines.append("us/ref: policy CPU per block reference (the master's eviction bookkeeping)"
                 + (f", the median of {runs} runs" if runs > 1 else ""))
    return "\n".join(lines)


#: The keys of the JSON line, in order (tools/bench_replay.py prints the same line).
JSON_KEYS = ("bench", "capacities", "policy", "lru", "belady", "geomean_gain_vs_lru", "min_gain_vs_lru", "us_per_ref")


def json_line(report: dict) -> str:
    return json.dumps({k: report[k] for k in JSON_KEYS}, separators=(",", ":"))


def run(args) -> int:
    from kvpool.cli.progress import bar
    from kvpool.replay import compare, compare_runs, load_trace

    if any(c <= 0 for c in args.capacity):
        print("kvpool replay: capacities must be positive", file=sys.stderr)
        return 2
    repeat = getattr(args, "repeat", 1)
    if repeat < 1:
        print("kvpool replay: --repeat must be at least 1", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace, limit=getattr(args, "limit", None))
    except (OSError, ValueError) as e:
        print(f"kvpool replay: {e}", file=sys.stderr)
        return 2
    # Progress on a terminal only, never under --json (kvpool.cli.progress), in requests
    # replayed over every run (the policy, LRU and Belady at each capacity).
    with bar(args, compare_runs(args.policy, repeat=repeat) * len(args.capacity) * len(trace),
             f"replay {trace.name}", unit="req") as progress:
        report = compare(trace, args.capacity, args.policy, progress=None if progress.disable else progress.update,
                         repeat=repeat)
    if not getattr(args, "json", False):
        print(format_report(report))
    print(json_line(report), flush=True)
    return 0


if __name__ == "__main__":  # python -m kvpool.cli.replay TRACE --capacity N
    _parser = argparse.ArgumentParser(prog="kvpool")
    _sub = _parser.add_subparsers(dest="command", required=True)
    register(_sub)
    _args = _parser.parse_args(["replay", *sys.argv[1:]])
    sys.exit(_args.func(_args))
