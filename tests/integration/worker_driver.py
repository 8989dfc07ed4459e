"""A router run as its own process on a test host (tests/hosts.py), driven by argv.

    python tests/integration/worker_driver.py PREFILL DECODE MAX_TOKENS PROMPTS_JSON

Sends the prompts (a JSON list of token lists) in order, one at a time, and prints one JSON
line: each request's output tokens and worker stats, and each worker's counters.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from kvpool.worker.router import Router  # noqa: E402


async def main(prefill: str, decode: str, max_tokens: int, prompts: list[list[int]]) -> dict:
    async with Router(prefill=[prefill], decode=[decode]) as router:
        results = []
        for p in prompts:
            r = await router.submit(p, max_tokens)
            results.append({"tokens": r.tokens, "prefill": r.prefill, "decode": r.decode})
        return {"results": results, "workers": await router.stats()}


if __name__ == "__main__":
    pre, dec, n, prompts = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(pre, dec, int(n), json.loads(prompts)))))
