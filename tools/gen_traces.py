#!/usr/bin/env python3
"""Write the seeded synthetic traces of ``kvpool.tracegen`` as FAST'25 jsonl files.

Usage: python tools/gen_traces.py OUT_DIR [--seed N] [--requests N]

Each file replays with ``kvpool replay FILE --capacity ...``. These traces are a check that a
policy generalizes to shapes of traffic it was not built on; never tune anything to them.
The last line is JSON: the files written, with their request and block counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvpool.tracegen import GENERATORS, write_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=12000)
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    written = {}
    for name, gen in GENERATORS.items():
        trace = gen(args.requests, seed=args.seed)
        path = os.path.join(args.out_dir, f"{name}_seed{args.seed}.jsonl")
        write_jsonl(trace, path)
        written[name] = {"path": path, "requests": len(trace), "blocks": trace.total_blocks}
        print(f"{path}: {len(trace)} requests, {trace.total_blocks} blocks")
    print(json.dumps({"bench": "gen_traces", "seed": args.seed, "traces": written}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
