"""The decode worker on another host: it pulls the prompt's KV over TCP and still produces
exactly the tokens of one process.

Host a runs `kvpool serve` (master and node, data server on a's address), the prefill
worker and the router (tests/integration/worker_driver.py); host b runs the decode worker
and no node, so every block it reads crosses the (virtual) network from node a.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")

from kvpool.worker import Engine, LlamaModel  # noqa: E402
from kvpool.worker.launch import start_worker  # noqa: E402
from tests.hosts import hosts  # noqa: E402,F401  (the fixture)

DRIVER = os.path.join(os.path.dirname(__file__), "worker_driver.py")
MODEL = ["--model", "tiny", "--seed", "11", "--cache-tokens", "4096"]
MAX_TOKENS = 5


def test_decode_worker_on_another_host_pulls_over_tcp(hosts):
    h = hosts(["a", "b"])
    a, b = h["a"], h["b"]
    _, m, _ = a.start_kvpool(["serve", "--host", a.address, "--insecure", "--port", "0", "--metrics-port", "-1",
                              "--prefault", "false", "--data-dir", f"/tmp/kvpool-test-{os.getpid()}-workers"],
                             r"ready grpc=(\S+) .*data=(\S+)")
    pool = m.group(1)
    assert m.group(2).startswith(a.address + ":")
    prefill = start_worker("prefill", "--pool", pool, "--host", a.address, *MODEL, popen=a.popen)
    decode = start_worker("decode", "--pool", pool, "--host", b.address, *MODEL, popen=b.popen)
    gen = torch.Generator().manual_seed(5)
    system = torch.randint(0, 512, (40,), generator=gen).tolist()
    prompts = [system + torch.randint(0, 512, (n,), generator=gen).tolist() for n in (0, 8, 24)]
    r = a.run([sys.executable, DRIVER, prefill.address, decode.address, str(MAX_TOKENS), json.dumps(prompts)],
              capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + decode.log()
    out = json.loads(r.stdout.strip().splitlines()[-1])

    engine = Engine(LlamaModel.seeded("tiny", seed=11), capacity_tokens=4096)
    for p, res in zip(prompts, out["results"]):
        assert res["tokens"] == engine.generate(p, MAX_TOKENS)
        assert res["decode"]["hit_tokens"] == len(p) // 16 * 16 > 0
    # The later turns reused the system prompt's blocks, and the decode worker read over TCP.
    assert [res["prefill"]["hit_tokens"] for res in out["results"]] == [0, 32, 32]
    assert out["workers"][decode.address]["transports"] == ["tcp"]
    assert out["workers"][prefill.address]["transports"] == ["shm"]
