"""A kvpool client run as its own process on a test host (tests/hosts.py), driven by argv.

    python tests/integration/remote_client.py publish MASTER SEED BLOCKS [--transport T]
    python tests/integration/remote_client.py fetch   MASTER SEED BLOCKS [--transport T]
    python tests/integration/remote_client.py stream  MASTER SEED BLOCKS SECONDS [--transport T]
    python tests/integration/remote_client.py stats   MASTER

``--model M`` names another namespace (the same layout); ``--replicas N`` registers it with
that replicas setting.

Every command prints one JSON line. Blocks and tokens come from SEED, so a writer on one host
and a reader on another agree on both without sharing anything but the master's address.
``fetch`` and ``stream`` compare every block they get with what the writer published: a
wrong byte is counted, never hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402

from kvpool import Client, Namespace, errors  # noqa: E402
from tests.integration.helpers import SMALL, random_blocks, tokens  # noqa: E402

NAMESPACE = Namespace(model="multi-host-test", layout=SMALL)


def _tokens(seed: int, blocks: int) -> list[int]:
    return tokens(blocks * SMALL.block_tokens, seed=seed)


def _client(args) -> Client:
    ns = Namespace(model=args.model, layout=SMALL)
    return Client(args.master, ns, transport=args.transport, connect_timeout=2.0, io_timeout=3.0,
                  replicas=args.replicas)


def publish(args) -> dict:
    with _client(args) as c:
        r = c.publish(_tokens(args.seed, args.blocks), random_blocks(args.blocks, seed=args.seed))
        return {"written": r.written, "present": r.present, "kinds": c._async.transports.open_kinds()}


def fetch(args) -> dict:
    want = random_blocks(args.blocks, seed=args.seed)
    with _client(args) as c:
        out = np.zeros_like(want)
        hit = c.fetch(_tokens(args.seed, args.blocks), out)
        return {"hit": hit, "ok": bool((out[:hit] == want[:hit]).all()), "kinds": c._async.transports.open_kinds()}


def stream(args) -> dict:
    """Fetch over and over for SECONDS; count good reads, wrong bytes and errors by kind."""
    want = random_blocks(args.blocks, seed=args.seed)
    toks = _tokens(args.seed, args.blocks)
    result = {"good": 0, "wrong": 0, "misses": 0, "errors": {}, "messages": [], "max_error_s": 0.0}
    deadline = time.monotonic() + args.seconds
    with _client(args) as c:
        while time.monotonic() < deadline:
            out = np.zeros_like(want)
            start = time.monotonic()
            try:
                hit = c.fetch(toks, out)
            except errors.KvpoolError as exc:
                name = type(exc).__name__
                result["errors"][name] = result["errors"].get(name, 0) + 1
                result["max_error_s"] = max(result["max_error_s"], time.monotonic() - start)
                if len(result["messages"]) < 5:
                    result["messages"].append(f"{name}: {exc}")
                time.sleep(0.05)
                continue
            if hit < args.blocks:
                result["misses"] += 1
            if not (out[:hit] == want[:hit]).all():
                result["wrong"] += 1
            elif hit:
                result["good"] += 1
                if result["good"] == 1:  # the test acts (kill, cut) only once reads work
                    print(json.dumps({"event": "reading"}), flush=True)
    return result


def stats(args) -> dict:
    with Client(args.master, NAMESPACE) as c:
        s = c.stats()
        return {"nodes": s.nodes, "blocks": s.blocks, "corrupt": s.corrupt_blocks,
                "tiers": [{"node": t.node_name, "tier": t.tier, "used": t.used_bytes} for t in s.tiers]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=("publish", "fetch", "stream", "stats"))
    p.add_argument("master")
    p.add_argument("seed", type=int, nargs="?", default=0)
    p.add_argument("blocks", type=int, nargs="?", default=4)
    p.add_argument("seconds", type=float, nargs="?", default=5.0)
    p.add_argument("--transport", default=None)
    p.add_argument("--model", default=NAMESPACE.model)
    p.add_argument("--replicas", type=int, default=None)
    args = p.parse_args()
    try:
        out = globals()[args.command](args)
    except errors.KvpoolError as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
