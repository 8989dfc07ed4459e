#!/usr/bin/env python3
"""Load on one master: many client processes, a mixed workload, every fetched byte verified.

Starts a real ``kvpool serve`` (master and node in one process) and ``--clients`` client
processes (default 32), each an :class:`kvpool.AsyncClient` running one operation at a time
for ``--seconds`` (default 120; pass a smaller number for a short run):

* **publish** a prompt (two-phase put; the shared prefix is deduplicated),
* **match** a prompt (Lookup, count only),
* **fetch** a prompt (Lookup with a lease, then a shared-memory read) and compare every byte
  of every block read with what its key must hold,
* **remove** the tail blocks of a prompt,

over prompts that overlap: every prompt starts with the same system prefix, and prompts
are drawn from a small set, so clients race on the same keys. A block's bytes are a pure
function of its key, so any client can verify any block, whoever wrote it.

Measured in the same run:

* the master's own figures, from its Prometheus exporter and ``/proc``: Lookups/s and
  PutStarts/s it served, its CPU time per RPC served (user + system, of the whole
  ``kvpool serve`` process; with shared-memory clients its node threads are idle), and the
  p50/p99 latency of each RPC *at the master*: from the call's arrival at its first
  interceptor to the answer (``kvpool_rpc_duration_seconds``; waiting for its event loop
  included, gRPC's transport before that not), read as the upper bound of a histogram bucket;
* the latency of each RPC as its clients saw it (p50/p99; the clients' own CPU queueing,
  the network stack and gRPC on both sides included);
* the ceiling: the same clients calling the cheapest RPC there is (gRPC health Check) for a
  few seconds, which is what the master's gRPC stack answers at most on this machine, and
  the master's CPU per health check meanwhile (the cost of gRPC alone). The ratio says how
  much of the ceiling the real workload keeps.

The client processes run at a lower CPU priority (``--nice``, default 10) than the master:
in production the master has cores of its own and the clients are other machines' engines,
so on a small machine the clients must not take the master's CPU. The clients' latency
still includes their waiting for each other's CPU; the master's latency is what the master
did. ``--nice 0`` measures all of them on equal terms.

The line before last is JSON with all the details; the last line is the summary::

    {"bench":"load","clients":32,"seconds":…,"ops":…,"errors":…,"wrong_bytes":…,
     "lookup_per_s":…,"lookup_p99_ms":…,"put_per_s":…,"master_cpu_us_per_op":…,
     "client_lookup_p99_ms":…}

Like the other figures of the summary, ``lookup_p99_ms`` is the master's own: what the
master took (the issue that asked for this benchmark lists the p99 of each RPC among the
master's figures). ``client_lookup_p99_ms`` is what the clients saw, their own CPU queueing
included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

LAYOUT_ARGS = dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)  # 16 KiB blocks
PROMPTS = 48            # distinct prompts the clients draw from
PREFIX_BLOCKS = 8       # the system prefix every prompt shares
OWN_BLOCKS = 8          # blocks of each prompt after the prefix
MIX = (("publish", 0.25), ("match", 0.35), ("fetch", 0.30), ("remove", 0.10))


def _namespace():
    from kvpool import KVLayout, Namespace

    return Namespace(model="bench-load", layout=KVLayout(**LAYOUT_ARGS), tenant="bench")


def _tokens(prompt: int) -> list[int]:
    bt = LAYOUT_ARGS["block_tokens"]
    prefix = np.random.default_rng(0).integers(0, 32000, PREFIX_BLOCKS * bt)
    own = np.random.default_rng(1000 + prompt).integers(0, 32000, OWN_BLOCKS * bt)
    return np.concatenate([prefix, own]).tolist()


def _content(key: bytes, size: int) -> np.ndarray:
    """The bytes a block with this key holds: a pure function of the key."""
    return np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, size, dtype=np.uint8)


def _worker(address: str, seed: int, start, seconds: float, ceiling_s: float, nice: int, out) -> None:
    try:
        os.nice(nice)  # below the master: see the module docstring
        out.put(asyncio.run(_work(address, seed, start, seconds, ceiling_s)))
    except BaseException as exc:  # report, never hang the parent
        try:
            start.abort()
        except Exception:
            pass
        out.put({"fatal": f"{type(exc).__name__}: {exc}"})


async def _work(address: str, seed: int, start, seconds: float, ceiling_s: float) -> dict:
    """One client process: the mixed workload for ``seconds``, then the ceiling phase. Both
    begin when every process and the parent have reached the ``start`` barrier."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvpool import AsyncClient
    from kvpool.tiers.pinning import cuda_available

    # The client asks once whether CUDA is there, which imports torch: seconds per process,
    # and with many processes starting on few cores it could outlast a put grant. Pay it now.
    cuda_available()

    latencies: dict[str, list[float]] = {}

    class TimedClient(AsyncClient):
        async def _call(self, name, request):
            t0 = time.perf_counter()
            try:
                return await super()._call(name, request)
            finally:
                took = time.perf_counter() - t0
                latencies.setdefault(name, []).append(took)
                if name == "Lookup":  # also apart: match (count only) and fetch (leased)
                    latencies.setdefault("Lookup.count_only" if request.count_only else "Lookup.leased",
                                         []).append(took)

    ns = _namespace()
    size = ns.layout.block_bytes
    rng = np.random.default_rng(seed)
    prompts = [(_tokens(p), ns.keys(_tokens(p))) for p in range(PROMPTS)]
    contents: dict[bytes, np.ndarray] = {}

    def content(key: bytes) -> np.ndarray:
        c = contents.get(key)
        if c is None:
            c = contents[key] = _content(key, size)
        return c

    ops = {name: 0 for name, _ in MIX}
    errors: dict[str, int] = {}
    wrong = blocks_read = 0
    names = [n for n, _ in MIX]
    weights = np.array([w for _, w in MIX])
    async with TimedClient(address, ns) as c:
        # Connect, register and warm up before the clock starts.
        toks, keys = prompts[seed % PROMPTS]
        await c.publish(toks, np.stack([content(k) for k in keys]))
        await c.fetch(toks, np.empty((len(keys), size), dtype=np.uint8))
        start.wait(timeout=600)
        latencies.clear()
        deadline = time.monotonic() + seconds
        out = np.empty((PREFIX_BLOCKS + OWN_BLOCKS, size), dtype=np.uint8)
        while time.monotonic() < deadline:
            op = names[rng.choice(len(names), p=weights)]
            toks, keys = prompts[int(rng.integers(PROMPTS))]
            try:
                if op == "publish":
                    await c.publish(toks, np.stack([content(k) for k in keys]))
                elif op == "match":
                    await c.match(toks)
                elif op == "fetch":
                    hit = await c.fetch(toks, out)
                    for i in range(hit):
                        diff = int(np.count_nonzero(out[i] != content(keys[i])))
                        wrong += diff
                    blocks_read += hit
                else:
                    await c.remove(keys[PREFIX_BLOCKS + int(rng.integers(OWN_BLOCKS)):])
                ops[op] += 1
            except Exception as exc:  # counted, and the run goes on
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        # The ceiling: the cheapest RPC the server has, from the same processes.
        start.wait(timeout=600)
        calls = 0
        async with grpc.aio.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            end = time.monotonic() + ceiling_s
            while time.monotonic() < end:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                calls += 1
    return {"ops": ops, "errors": errors, "wrong": wrong, "blocks_read": blocks_read, "latencies": latencies,
            "ceiling_calls": calls}


def _start_server() -> tuple[subprocess.Popen, str, str]:
    data_dir = tempfile.mkdtemp(prefix="kvpool-bench-load-")
    proc = subprocess.Popen([sys.executable, "-m", "kvpool", "serve", "--port", "0", "--metrics-port", "0",
                             "--dram", "512MiB", "--prefault", "false", "--data-dir", data_dir],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"ready grpc=(\S+) metrics=(\S+)", line)
        if m:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1), m.group(2)
    proc.kill()
    raise SystemExit("kvpool serve did not become ready")


def _rpc_histogram(metrics_url: str) -> dict[str, dict[float, float]]:
    """Per method, the cumulative bucket counts (upper bound in s -> calls) of the master's
    ``kvpool_rpc_duration_seconds`` histogram: from each call's arrival at the master to its answer."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "kvpool_rpc_duration_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    b = out.setdefault(s.labels["method"], {})
                    le = float(s.labels["le"])
                    b[le] = b.get(le, 0.0) + s.value
    return out


def _counts(hist: dict[str, dict[float, float]]) -> dict[str, float]:
    return {m: b[float("inf")] for m, b in hist.items()}


def _bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound (ms) of the histogram bucket holding quantile ``q`` of the calls between
    two snapshots: the master's own latency figure, as coarse as its buckets."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    for bound, n in zip(bounds, counts):
        if n >= q * counts[-1]:
            return bound * 1000
    return None


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000, q)) if samples else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32, help="client processes (default 32)")
    p.add_argument("--seconds", type=float, default=120.0, help="length of the measured run (default 120)")
    p.add_argument("--ceiling-seconds", type=float, default=5.0, help="length of the ceiling phase (default 5)")
    p.add_argument("--nice", type=int, default=10, help="CPU niceness of the client processes, above the "
                   "master's (default 10; 0: equal terms)")
    args = p.parse_args()

    server, address, metrics_url = _start_server()
    try:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        start = ctx.Barrier(args.clients + 1)
        procs = [ctx.Process(target=_worker, args=(address, i, start, args.seconds, args.ceiling_seconds, args.nice, out))
                 for i in range(args.clients)]
        for proc in procs:
            proc.start()
        try:
            start.wait(timeout=600)  # every client connected: go
        except threading.BrokenBarrierError:
            fatal = [out.get(timeout=60) for _ in range(1)]
            raise SystemExit(f"a client process failed before the start: {fatal}") from None
        h0, cpu0, t0 = _rpc_histogram(metrics_url), _cpu_seconds(server.pid), time.monotonic()
        time.sleep(args.seconds)
        h1, cpu1, t1 = _rpc_histogram(metrics_url), _cpu_seconds(server.pid), time.monotonic()
        start.wait(timeout=600)  # every client finished its last operation: the ceiling phase
        cpu2 = _cpu_seconds(server.pid)
        time.sleep(args.ceiling_seconds)
        cpu3 = _cpu_seconds(server.pid)  # before the clients hang up
        results = [out.get(timeout=args.ceiling_seconds + 300) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    fatal = [r["fatal"] for r in results if "fatal" in r]
    good = [r for r in results if "fatal" not in r]
    elapsed = t1 - t0
    before, after = _counts(h0), _counts(h1)
    served = {m: after.get(m, 0.0) - before.get(m, 0.0) for m in after}
    rpcs = sum(served.values())
    ops = {k: sum(r["ops"][k] for r in good) for k, _ in MIX}
    errors: dict[str, int] = {}
    for r in good:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    latencies: dict[str, list[float]] = {}
    for r in good:
        for k, v in r["latencies"].items():
            latencies.setdefault(k, []).extend(v)
    ceiling = sum(r["ceiling_calls"] for r in good) / args.ceiling_seconds
    health_calls = sum(r["ceiling_calls"] for r in good)
    master_ms = {m: {"p50": _bucket_quantile(h0.get(m, {}), h1[m], 0.5),
                     "p99": _bucket_quantile(h0.get(m, {}), h1[m], 0.99)}
                 for m in sorted(h1) if served.get(m)}
    cpu_us = (cpu1 - cpu0) / rpcs * 1e6 if rpcs else 0.0
    detail = {
        "bench": "load-detail", "cores": os.cpu_count(), "clients": args.clients, "clients_failed": len(fatal),
        "fatal": fatal[:3], "ops_by_kind": ops, "errors_by_kind": errors,
        "blocks_read_verified": sum(r["blocks_read"] for r in good),
        "master_rpcs_per_s": {m: round(n / elapsed, 1) for m, n in sorted(served.items()) if n},
        "master_rpc_per_s": round(rpcs / elapsed, 1), "master_cpu_s": round(cpu1 - cpu0, 2),
        "master_cpu_share": round((cpu1 - cpu0) / elapsed, 3),
        "rpc_latency_ms": {m: {"p50": round(_pct(v, 50), 3), "p99": round(_pct(v, 99), 3), "n": len(v)}
                           for m, v in sorted(latencies.items())},
        "client_nice": args.nice,
        "master_rpc_ms_at_most": master_ms,
        "ceiling_health_rpc_per_s": round(ceiling, 1),
        "master_cpu_us_per_health_check": round((cpu3 - cpu2) / health_calls * 1e6, 1) if health_calls else None,
        "ratio_rpc_to_ceiling": round(rpcs / elapsed / ceiling, 3) if ceiling else None,
    }
    print(json.dumps(detail))
    print(json.dumps({
        "bench": "load", "clients": args.clients, "seconds": round(elapsed, 1), "ops": sum(ops.values()),
        "errors": sum(errors.values()) + len(fatal), "wrong_bytes": sum(r["wrong"] for r in good),
        "lookup_per_s": round(served.get("Lookup", 0.0) / elapsed, 1),
        "lookup_p99_ms": master_ms.get("Lookup", {}).get("p99"),  # at the master (bucket bound)
        "put_per_s": round(served.get("PutStart", 0.0) / elapsed, 1),
        "master_cpu_us_per_op": round(cpu_us, 1),
        "client_lookup_p99_ms": round(_pct(latencies.get("Lookup", []), 99), 2),  # as clients saw it
    }))


if __name__ == "__main__":
    main()
