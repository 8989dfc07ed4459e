"""``kvpool demo``: one workload through three setups, and one table.

It starts everything it needs as child processes on loopback (an embedded pool, ``kvpool
serve``, for each disaggregated setup, and the workers, ``python -m kvpool.worker``) and
plays the same requests through

1. **colocated, no pool**: one worker prefills and decodes every request itself;
2. **disaggregated, no reuse**: a prefill worker computes every prompt and publishes its
   blocks; a decode worker pulls them and generates;
3. **disaggregated + pool**: the same, but the prefill worker first fetches the longest
   cached prefix of each prompt from the pool and computes only the rest.

The workload is multi-turn conversations sharing a system prompt (each turn's prompt is the
whole conversation so far), or, with ``--trace``, FAST'25 records scaled to the model. The
table gives TTFT p50/p99, the prefix hit rate, output tokens/s, and the bytes fetched from
the pool against the prompt tokens computed; the last line says whether the three setups
produced the same tokens (they must: see kvpool/worker/engine.py). ``--json`` prints one
JSON document instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

__all__ = ["register", "run", "SETUPS"]

#: (key, label) of each setup, in the order they run.
SETUPS = (("colocated", "colocated, no pool"), ("no_reuse", "disaggregated, no reuse"),
          ("pool", "disaggregated + pool"))


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="prefill/decode disaggregation with and without the pool, on a small model",
        description="Run one workload colocated, disaggregated without reuse, and disaggregated with "
                    "the pool; print TTFT, prefix hit rate, tokens/s and bytes fetched vs tokens computed.")
    p.add_argument("--model", default="small", help="tiny, small, or a Hugging Face Llama checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the named model's weights and of the workload")
    p.add_argument("--conversations", type=int, default=8, help="conversations played side by side")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation")
    p.add_argument("--system-tokens", type=int, default=512, help="tokens of the shared system prompt")
    p.add_argument("--user-tokens", type=int, default=64, help="tokens of each user message")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per turn (at most, with --trace)")
    p.add_argument("--trace", default=None, help="replay a FAST'25 jsonl trace instead of conversations")
    p.add_argument("--trace-requests", type=int, default=32, help="first N records of --trace")
    p.add_argument("--trace-block-tokens", type=int, default=None,
                   help="tokens per 512-token trace block (default: the model's pool block)")
    p.add_argument("--concurrency", type=int, default=8, help="sessions in flight at once")
    p.add_argument("--dram", default="512MiB", help="DRAM tier of each embedded pool")
    p.add_argument("--cache-tokens", type=int, default=65536, help="each worker's paged KV cache, in tokens")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.set_defaults(func=run)
    return p


def _model_config(model: str):
    from kvpool.worker.config import CONFIGS, ModelConfig

    if model in CONFIGS:
        return CONFIGS[model]
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--model {model!r} is neither {' nor '.join(CONFIGS)} nor a checkpoint directory")
    with open(path) as f:
        return ModelConfig.from_hf(json.load(f), name=os.path.basename(os.path.normpath(model)))


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else 0.0


async def _play(router, sessions, concurrency: int, progress) -> tuple[list, float]:
    """Every session's turns in order, ``concurrency`` sessions at a time."""
    gate = asyncio.Semaphore(concurrency)
    outcomes: list[list] = [[] for _ in sessions]

    async def session(i: int) -> None:
        async with gate:
            history: list[int] = []
            for turn in sessions[i]:
                prompt = history + turn.prefix if turn.follow_up else list(turn.prefix)
                result = await router.submit(prompt, turn.max_tokens)
                outcomes[i].append(result)
                history = prompt + result.tokens
                progress.update(1)

    t0 = time.perf_counter()
    await asyncio.gather(*(session(i) for i in range(len(sessions))))
    return outcomes, time.perf_counter() - t0


def _summary(outcomes: list[list], wall: float) -> dict:
    flat = [r for s in outcomes for r in s]
    ttft = [r.ttft_s * 1e3 for r in flat]
    prompt = sum(r.prompt_tokens for r in flat)
    hit = sum(r.prefill.get("hit_tokens", 0) for r in flat)
    out_tokens = sum(len(r.tokens) for r in flat)
    return {
        "requests": len(flat),
        "ttft_p50_ms": round(_percentile(ttft, 50), 2),
        "ttft_p99_ms": round(_percentile(ttft, 99), 2),
        "prefix_hit_rate": round(hit / prompt, 4) if prompt else 0.0,
        "tokens_per_s": round(out_tokens / wall, 2) if wall else 0.0,
        "prompt_tokens": prompt,
        "output_tokens": out_tokens,
        "fetched_bytes": sum(r.prefill.get("fetched_bytes", 0) + r.decode.get("fetched_bytes", 0) for r in flat),
        "computed_tokens": sum(r.prefill.get("computed_tokens", 0) + r.decode.get("computed_tokens", 0)
                               for r in flat),
        "wall_s": round(wall, 3),
    }


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(report: dict) -> str:
    head = (f"{'setup':<26}{'TTFT p50':>10}{'TTFT p99':>10}{'prefix hit':>12}{'tokens/s':>10}"
            f"{'fetched':>12}{'computed':>12}")
    lines = [f"kvpool demo: model {report['model']}, {report['workload']}", head, "-" * len(head)]
    for key, label in SETUPS:
        s = report["setups"][key]
        lines.append(f"{label:<26}{s['ttft_p50_ms']:>8.1f}ms{s['ttft_p99_ms']:>8.1f}ms"
                     f"{s['prefix_hit_rate'] * 100:>11.1f}%{s['tokens_per_s']:>10.1f}"
                     f"{_bytes(s['fetched_bytes']):>12}{s['computed_tokens']:>8} tok")
    same = "identical in all three setups" if report["identical_outputs"] else "DIFFERENT between setups"
    lines.append(f"outputs: {same} ({report['setups']['pool']['requests']} requests, "
                 f"{report['setups']['pool']['output_tokens']} output tokens per setup)")
    return "\n".join(lines)


def run(args) -> int:
    from tqdm import tqdm

    from kvpool.worker.launch import SERVE_READY, WORKER_READY, serve_argv, spawn_child, stop_process, worker_argv
    from kvpool.worker.router import Router
    from kvpool.worker.workload import conversations, trace_sessions

    try:
        cfg = _model_config(args.model)
        if args.trace:
            per_block = args.trace_block_tokens or cfg.block_tokens
            sessions = trace_sessions(args.trace, args.trace_requests, per_block, args.max_tokens, cfg.vocab_size)
            workload = f"{len(sessions)} FAST'25 records of {os.path.basename(args.trace)}, {per_block} tokens per trace block"
        else:
            for name in ("conversations", "turns", "system_tokens", "user_tokens", "max_tokens"):
                if getattr(args, name) < 1:
                    raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
            sessions = conversations(args.conversations, args.turns, args.system_tokens, args.user_tokens,
                                     args.max_tokens, cfg.vocab_size, seed=args.seed)
            workload = (f"{args.conversations} conversations x {args.turns} turns, {args.system_tokens}-token "
                        f"system prompt, {args.user_tokens}-token messages, {args.max_tokens} tokens out")
    except (OSError, ValueError) as e:
        print(f"kvpool demo: {e}", file=sys.stderr)
        return 2
    total = sum(len(s) for s in sessions)
    model_arg = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    model = ["--model", model_arg, "--seed", str(args.seed), "--cache-tokens", str(args.cache_tokens)]
    spawned = []
    with tempfile.TemporaryDirectory(prefix="kvpool-demo-") as tmp:

        def spawn(argv, ready):
            spawned.append(spawn_child(argv, ready, cwd=tmp))
            return spawned[-1]

        try:
            # Everything boots in parallel: two pools first (the workers need their addresses).
            waits = [spawn(serve_argv(os.path.join(tmp, k), args.dram), SERVE_READY) for k in ("a", "b")]
            pools = [w() for w in waits]
            waits = {
                "colocated": [spawn(worker_argv("colocated", *model), WORKER_READY)],
                "no_reuse": [spawn(worker_argv("prefill", "--pool", pools[0].address, "--reuse", "false", *model),
                                   WORKER_READY),
                             spawn(worker_argv("decode", "--pool", pools[0].address, *model), WORKER_READY)],
                "pool": [spawn(worker_argv("prefill", "--pool", pools[1].address, *model), WORKER_READY),
                         spawn(worker_argv("decode", "--pool", pools[1].address, *model), WORKER_READY)],
            }
            workers = {key: [w(timeout=300) for w in ws] for key, ws in waits.items()}
            report = {"model": cfg.model_id, "workload": workload, "setups": {}}
            tokens = {}
            with tqdm(total=3 * total, desc="kvpool demo", unit="req", file=sys.stderr,
                      disable=args.json or None) as bar:
                for key, label in SETUPS:
                    bar.set_postfix_str(label)
                    addrs = [c.address for c in workers[key]]
                    router = Router(colocated=addrs) if key == "colocated" else Router(prefill=addrs[:1],
                                                                                       decode=addrs[1:])

                    async def play(router=router):
                        async with router:
                            return await _play(router, sessions, args.concurrency, bar)

                    outcomes, wall = asyncio.run(play())
                    report["setups"][key] = _summary(outcomes, wall)
                    tokens[key] = [[r.tokens for r in s] for s in outcomes]
        except Exception as e:  # noqa: BLE001 - a child that did not start, or a worker error: say which
            print(f"kvpool demo: {e}", file=sys.stderr)
            return 1
        finally:
            for w in reversed(spawned):
                stop_process(w.proc)
    report["identical_outputs"] = tokens["colocated"] == tokens["no_reuse"] == tokens["pool"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0 if report["identical_outputs"] else 1
