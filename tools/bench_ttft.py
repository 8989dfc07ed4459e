"""TTFT of a long prompt, cold against a prefix cached in the pool, through the real workers.

    python tools/bench_ttft.py                                  # CPU, small model, 4096 tokens
    python tools/bench_ttft.py --device cuda --tokens 32768     # GPU: Triton kernels, bfloat16

Starts `kvpool serve`, a prefill worker and a decode worker (`python -m kvpool.worker`) and
routes requests through them as `kvpool demo` does. TTFT is from the router's submit until
the first token is back at the router: pool lookup and fetch, prefill, publishing the new
blocks, and the hops between processes.

* cold: a prompt nothing in the pool shares, computed in full (the ceiling: what the pool
  saves is measured against it, in the same run, on the same processes);
* cached: the same prompt again: every full block but the last comes from the pool
  (the block holding the last prompt token is computed, for its logits), so the prefill
  worker fetches ``tokens - block_tokens`` tokens of KV and computes ``block_tokens``.

Each repetition uses a fresh random prompt; medians are reported. One untimed request of
the same size runs first (Triton compiles its kernels then). Target: cached/cold <= 0.25.
The last line is the JSON result:
{"bench":"ttft","tokens":4096,"cold_ms":...,"cached_ms":...,"ratio":...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile

from kvpool.worker.launch import SERVE_READY, WORKER_READY, serve_argv, spawn_child, stop_process, worker_argv
from kvpool.worker.router import Router


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the Triton kernels")
    ap.add_argument("--model", default="small")
    ap.add_argument("--block-tokens", type=int, default=None, help="pool block = prefill chunk (default: the model's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dram", default="1GiB", help="the pool's DRAM tier")
    ap.add_argument("--hbm", default="0", help="the pool's HBM tier (CUDA only), e.g. 4GiB")
    args = ap.parse_args()

    import numpy as np

    from kvpool.worker.config import config_named

    cfg = config_named(args.model)
    model = ["--model", args.model, "--device", args.device, "--cache-tokens", str(2 * args.tokens + 1024)]
    if args.block_tokens:
        model += ["--block-tokens", str(args.block_tokens)]
    block = args.block_tokens or cfg.block_tokens
    spawned = []
    with tempfile.TemporaryDirectory(prefix="kvpool-bench-ttft-") as tmp:
        try:
            extra = ("--hbm", args.hbm) if args.hbm != "0" else ()
            spawned.append(spawn_child(serve_argv(tmp, args.dram, extra), SERVE_READY, cwd=tmp))
            pool = spawned[-1](timeout=120)
            spawned += [spawn_child(worker_argv(role, "--pool", pool.address, *model), WORKER_READY, cwd=tmp)
                        for role in ("prefill", "decode")]
            prefill, decode = (w(timeout=600) for w in spawned[1:])
            rng = np.random.default_rng(0)

            async def run() -> list[tuple]:
                async with Router(prefill=[prefill.address], decode=[decode.address]) as router:
                    rows = []
                    for rep in range(args.reps + 1):
                        prompt = rng.integers(0, cfg.vocab_size, args.tokens).tolist()
                        cold = await router.submit(prompt, 1)
                        cached = await router.submit(prompt, 1)
                        if cached.tokens != cold.tokens:
                            raise SystemExit(f"cached prefix changed the output: {cold.tokens} vs {cached.tokens}")
                        if rep:  # the first is the warm-up
                            rows.append((cold, cached))
                            print(f"rep {rep}: cold {cold.ttft_s * 1e3:.1f} ms (computed "
                                  f"{cold.prefill['computed_tokens']} tokens, prefill {cold.prefill['compute_ms']:.1f} ms); "
                                  f"cached {cached.ttft_s * 1e3:.1f} ms (fetched {cached.prefill['hit_tokens']} tokens = "
                                  f"{cached.prefill['fetched_bytes'] / 2**20:.1f} MiB, computed "
                                  f"{cached.prefill['computed_tokens']}, prefill {cached.prefill['compute_ms']:.1f} ms)",
                                  flush=True)
                    return rows

            rows = asyncio.run(run())
        finally:
            for w in reversed(spawned):
                stop_process(w.proc)
    expect_hit = (args.tokens - 1) // block * block
    for cold, cached in rows:
        assert cold.prefill["hit_tokens"] == 0, cold.prefill
        assert cached.prefill["hit_tokens"] == expect_hit, (cached.prefill, expect_hit)
    cold_ms = statistics.median(c.ttft_s for c, _ in rows) * 1e3
    cached_ms = statistics.median(c.ttft_s for _, c in rows) * 1e3
    print(f"device {args.device}, model {args.model}, {args.tokens} tokens, blocks of {block}: "
          f"cold {cold_ms:.1f} ms, cached {cached_ms:.1f} ms (target cached/cold <= 0.25)")
    print(json.dumps({"bench": "ttft", "tokens": args.tokens, "cold_ms": round(cold_ms, 1),
                      "cached_ms": round(cached_ms, 1), "ratio": round(cached_ms / cold_ms, 3)},
                     separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
